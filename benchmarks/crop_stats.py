"""KS distances of every backend's RandomResizedCrop against the spec, as a table (issue 14's "KS statistics of the
new path"): the measurement of tests/pipelines/test_augmentation_stats.py, printed instead of asserted.

    .venv/bin/python benchmarks/crop_stats.py            # one view per sample
    .venv/bin/python benchmarks/crop_stats.py --views    # multi-crop: every plain view of the test's VIEWS (MoCo-v3's
                                                         # second size, DINO's global and local crops) on every backend
"""
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pipelines"))
import test_augmentation_stats as T  # noqa: E402  (the test's own image, spec sampler and measurement)


def main() -> None:
    root = Path(tempfile.mkdtemp()) / "coords"
    (root / "c").mkdir(parents=True)
    x = np.linspace(0, 255, T.W)[None, :].repeat(T.H, 0)
    y = np.linspace(0, 255, T.H)[:, None].repeat(T.W, 1)
    img = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    jpeg_root = root.parent / "coords_jpeg"  # turbo reads the JPEG twin (T.measured_samples knows where)
    (jpeg_root / "c").mkdir(parents=True)
    Image.fromarray(img).save(root / "c" / "0000.png")
    Image.fromarray(img).save(jpeg_root / "c" / "0000.jpg", quality=100, subsampling=0)
    for i in range(1, T.N_COPIES):
        (root / "c" / f"{i:04d}.png").symlink_to(root / "c" / "0000.png")
        (jpeg_root / "c" / f"{i:04d}.jpg").symlink_to(jpeg_root / "c" / "0000.jpg")
    if "--views" in sys.argv:
        multi_crop(root)
        return
    spec = T.spec_samples(20_000, np.random.default_rng(0))
    print("| backend | crops | KS area | KS log ratio | critical (alpha 0.001) | flip rate |\n|---|---:|---:|---:|---:|---:|")
    for backend in ("torchvision", "turbo", "ffcv", "dali"):
        crops, flips = T.measured_samples(root, backend)
        n = len(crops)
        crit = 1.95 * math.sqrt((n + len(spec)) / (n * len(spec)))
        print(f"| {backend} | {n} | {T.ks_distance(crops[:, 0], spec[:, 0]):.3f} | "
              f"{T.ks_distance(np.log(crops[:, 1]), np.log(spec[:, 1])):.3f} | {crit:.3f} | {flips.mean():.3f} |")


def multi_crop(root: Path) -> None:
    """One loader per backend yielding all of T.VIEWS at once; each plain view against the spec at its own size
    and area range."""
    print("| backend | view | size | area range | crops | KS area | KS log ratio | critical (alpha 0.001) | flip rate |\n"
          "|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for backend in ("torchvision", "turbo", "ffcv", "dali"):
        measured, _, _ = T.measured_samples(root, backend, views=T.VIEWS)
        for v, scale in T.GEOMETRY.items():
            crops, flips = measured[v]
            spec = T.spec_samples(20_000, np.random.default_rng(0), scale)
            n = len(crops)
            crit = 1.95 * math.sqrt((n + len(spec)) / (n * len(spec)))
            print(f"| {backend} | {v} | {T.VIEWS[v].size or T.OUT} | {scale[0]}-{scale[1]} | {n} | "
                  f"{T.ks_distance(crops[:, 0], spec[:, 0]):.3f} | "
                  f"{T.ks_distance(np.log(crops[:, 1]), np.log(spec[:, 1])):.3f} | {crit:.3f} | {flips.mean():.3f} |")


if __name__ == "__main__":
    main()
