"""Each backend's RandomResizedCrop + flip follow the spec, measured on many samples.

The input is a "coordinate image" (red = x, green = y, scaled to 0..255) the size of a typical photograph:
each output's borders tell the crop box and whether it was flipped. Areas and aspect ratios are compared with
the spec's algorithm (torchvision's RandomResizedCrop sampling, simulated in numpy) by a two-sample
Kolmogorov-Smirnov distance; the flip rate with a binomial bound."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import PipelineConfig, build_loader

W, H = 500, 375  # ImageNet-like
OUT = 64
N_COPIES, EPOCHS = 50, 12  # 600 samples per backend
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


@pytest.fixture(scope="module")
def coord_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords")
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    img = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    (root / "c").mkdir()
    Image.fromarray(img).save(root / "c" / "0000.png")
    for i in range(1, N_COPIES):
        (root / "c" / f"{i:04d}.png").symlink_to(root / "c" / "0000.png")
    return root


@pytest.fixture(scope="module")
def coord_jpeg_tree(coord_tree):
    """The coordinate image as a quality-100 JPEG (4:4:4), for the turbo backend's crop decoder: the JPEG path,
    not PIL's fallback for PNGs."""
    root = coord_tree.parent / "coords_jpeg"
    (root / "c").mkdir(parents=True, exist_ok=True)
    Image.open(coord_tree / "c" / "0000.png").save(root / "c" / "0000.jpg", quality=100, subsampling=0)
    for i in range(1, N_COPIES):
        (root / "c" / f"{i:04d}.jpg").symlink_to(root / "c" / "0000.jpg")
    return root


def spec_samples(n, rng):
    """torchvision's RandomResizedCrop.get_params for a W x H image: (area fraction, aspect w/h)."""
    out = []
    log_r = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(n):
        for _ in range(10):
            area = W * H * rng.uniform(*SCALE)
            ar = math.exp(rng.uniform(*log_r))
            w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < w <= W and 0 < h <= H:
                break
        else:  # fallback: the largest central crop within the ratio range
            r = W / H
            w, h = (W, int(round(W / RATIO[1]))) if r > RATIO[1] else (int(round(H * RATIO[0])), H) if r < RATIO[0] else (W, H)
        out.append((w * h / (W * H), w / h))
    return np.array(out)


def measured_samples(root, backend, scale=SCALE):
    path = root
    if backend == "ffcv":  # raw pixels: a JPEG round trip would blur the coordinates
        from pipelines.beton import ConvertSettings, convert

        path = root.parent / "coords.beton"
        if not path.exists():
            convert(root, path, ConvertSettings(mode="raw", workers=2))
    if backend == "turbo":
        path = root.parent / "coords_jpeg"
    cfg = PipelineConfig(backend=backend, path=str(path), workers=0 if backend == "torchvision" else 2,
                         interpolation="random",
                         crop_scale=scale, crop_ratio=RATIO, mean=(0, 0, 0), std=(1, 1, 1))
    loader = build_loader(cfg, img_size=OUT, batch_size=N_COPIES, seed=7, device="cpu")
    crops, flips = [], []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for b in loader:
            img = b.images * 255  # mean 0, std 1: back to 0..255
            r, g = img[:, 0], img[:, 1]
            left, right = r[:, :, 0].mean(1), r[:, :, -1].mean(1)
            top, bottom = g[:, 0, :].mean(1), g[:, -1, :].mean(1)
            flipped = left > right
            # the border pixel centres sit half an output pixel inside the crop: widen by one output pixel
            cw = (left - right).abs() / 255 * (W - 1) * OUT / (OUT - 1)
            ch = (bottom - top).abs() / 255 * (H - 1) * OUT / (OUT - 1)
            crops += list(zip((cw * ch / (W * H)).tolist(), (cw / ch).tolist()))
            flips += flipped.tolist()
    return np.array(crops), np.array(flips)


def ks_distance(a, b):
    grid = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return np.abs(ca - cb).max()


@pytest.mark.parametrize("backend", ["torchvision", "ffcv", "dali", "turbo"])
def test_crop_area_aspect_and_flip_follow_the_spec(coord_tree, coord_jpeg_tree, backend):
    crops, flips = measured_samples(coord_tree, backend)
    n = len(crops)
    assert n == N_COPIES * EPOCHS
    spec = spec_samples(20_000, np.random.default_rng(0))
    # two-sample KS critical distance at alpha = 0.001 is 1.95 * sqrt((n + m) / (n m))
    crit = 1.95 * math.sqrt((n + len(spec)) / (n * len(spec)))
    d_area = ks_distance(crops[:, 0], spec[:, 0])
    d_ratio = ks_distance(np.log(crops[:, 1]), np.log(spec[:, 1]))
    assert d_area < crit, f"{backend}: crop-area distribution is off the spec (KS {d_area:.3f} >= {crit:.3f})"
    assert d_ratio < crit, f"{backend}: aspect-ratio distribution is off the spec (KS {d_ratio:.3f} >= {crit:.3f})"
    rate = flips.mean()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / n), f"{backend}: flip rate {rate:.3f}"


@pytest.mark.parametrize("backend", ["dali", "turbo"])
def test_the_statistic_can_fail(coord_tree, coord_jpeg_tree, backend):
    """A real loader cropping at scale (0.5, 1) instead of the spec's (0.08, 1) is caught (KS ~0.6 here)."""
    crops, _ = measured_samples(coord_tree, backend, scale=(0.5, 1.0))
    spec = spec_samples(20_000, np.random.default_rng(0))
    crit = 1.95 * math.sqrt((len(crops) + len(spec)) / (len(crops) * len(spec)))
    assert ks_distance(crops[:, 0], spec[:, 0]) > crit
