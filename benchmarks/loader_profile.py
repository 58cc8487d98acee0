"""Per-stage CPU profile of the MAE pre-training input pipeline (issue 14, step 1 "profile first").

Single process, one torch thread. Over the same N images of a class-folder tree, each stage of the reference
path (pipelines/torchvision_loader.py: ImageFolder + PIL + transforms.v2 RandomResizedCrop/flip + PILToTensor,
DataLoader collation, DeviceNormalize) is timed on its own, side by side in one run: 1 warm-up pass, then the
median of `--passes` passes. The stage sum is checked against the real loader (`pipelines.build_loader`,
workers=0) end to end. With --beton, FFCV is split the same way: its real FfcvLoader (workers=1), a decode-only
FFCV pipeline, the RandomResizedCrop decoder alone, and the decoder + flip.

    .venv/bin/python benchmarks/loader_profile.py /tmp/prof/tree256 --beton /tmp/prof/tree256.beton --json out.json
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastvit_pt.bench_loader import epoch_rates  # noqa: E402  (the one warm-up + timed-epochs loop)

IMG, BATCH = 224, 64


def _median_us(fn, passes: int, n: int) -> float:
    """fn() runs one pass over n items; warm-up once, then the median of `passes`, in µs per item."""
    fn()
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n * 1e6


def profile_torchvision(root: str, n: int, passes: int, seed: int = 0) -> dict:
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

    import pipelines
    from pipelines.base import DeviceNormalize, sample_seed
    from pipelines.config import PipelineConfig
    from pipelines.folder import scan_folder
    from pipelines.torchvision_loader import train_transform

    cfg = PipelineConfig(backend="torchvision", path=root, workers=0, interpolation="random")
    samples, _ = scan_folder(root)
    samples = samples[:n]
    n = len(samples)
    paths = [p for p, _ in samples]
    transform = train_transform(cfg, IMG)
    rrc = v2.RandomResizedCrop(IMG, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True)

    # inputs each stage needs, prepared once outside the timed loops
    blobs = [open(p, "rb").read() for p in paths]
    imgs = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            imgs.append(im.convert("RGB"))
    torch.manual_seed(seed)
    params = [rrc.make_params([im]) for im in imgs]
    crops_bl = [F.resized_crop(im, **{k: p[k] for k in ("top", "left", "height", "width")}, size=[IMG, IMG],
                               interpolation=InterpolationMode.BILINEAR, antialias=True) for im, p in zip(imgs, params)]
    tensors = [v2.PILToTensor()(c) for c in crops_bl]
    items = [(t, 0, sample_seed(seed, 0, i)) for i, t in enumerate(tensors)]
    norm = DeviceNormalize(cfg.mean, cfg.std, "cpu", torch.float32)
    nb = n // BATCH
    batches = [torch.utils.data.default_collate(items[b * BATCH:(b + 1) * BATCH]) for b in range(nb)]

    # crop-aware draft request: the smallest decoded size that still leaves the crop >= IMG px on both sides
    def draft_size(im_size, p):
        w, h = im_size
        return (max(1, -(-w * IMG // p["width"])), max(1, -(-h * IMG // p["height"])))

    sizes = [im.size for im in imgs]
    draft_scales = []

    def read():
        for p in paths:
            with open(p, "rb") as f:
                f.read()

    def decode_full():
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                im.convert("RGB")

    def decode_open_convert_path():  # exactly FolderDataset: Image.open(path) + convert (read included)
        for p in paths:
            with Image.open(p) as im:
                im.convert("RGB")

    def decode_draft_crop_aware():
        draft_scales.clear()
        for b, s, p in zip(blobs, sizes, params):
            with Image.open(io.BytesIO(b)) as im:
                im.draft("RGB", draft_size(s, p))
                draft_scales.append(int(round(s[0] / im.size[0])))  # DCT scale 1, 2, 4 or 8
                im.convert("RGB")

    def decode_draft_half():  # DCT scale 1/2 forced: what JPEG scaling alone saves on the decode
        for b, s in zip(blobs, sizes):
            with Image.open(io.BytesIO(b)) as im:
                im.draft("RGB", (s[0] // 2, s[1] // 2))
                im.convert("RGB")

    def seeding():  # FolderDataset.__getitem__'s per-sample RNG bookkeeping with workers=0
        for i in range(n):
            saved = (random.getstate(), np.random.get_state())
            s = sample_seed(seed, 0, i)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % 2**32)
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    def seed_torch_only():
        for i in range(n):
            torch.manual_seed(sample_seed(seed, 0, i))

    def py_np_state_save_restore():
        for i in range(n):
            saved = (random.getstate(), np.random.get_state())
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    def param_draw():
        for im in imgs:
            torch.rand(())  # RandomChoice's pick
            rrc.make_params([im])

    def crop_resize(mode):
        def run():
            for im, p in zip(imgs, params):
                F.resized_crop(im, p["top"], p["left"], p["height"], p["width"], [IMG, IMG], interpolation=mode,
                               antialias=True)
        return run

    def flip():
        for c in crops_bl:
            F.horizontal_flip(c)

    def to_tensor():
        t = v2.PILToTensor()
        for c in crops_bl:
            t(c)

    def collate():
        for b in range(nb):
            torch.utils.data.default_collate(items[b * BATCH:(b + 1) * BATCH])

    def normalize():
        for x, y, k in batches:
            norm(x, y, k)

    mean, inv_std = norm.mean, norm.inv_std
    out_buf = torch.empty(batches[0][0].shape, dtype=torch.float32)

    def normalize_prealloc():  # the same arithmetic into one reused buffer: what fresh 38 MB allocations cost
        for x, _, _ in batches:
            torch.sub(x, mean, out=out_buf).mul_(inv_std)

    def full_transform():  # the v2 Compose on a decoded image (draw + crop/resize + flip + to-tensor + dispatch)
        for i, im in enumerate(imgs):
            torch.manual_seed(sample_seed(seed, 0, i))
            transform(im)

    stages = {}
    stages["file read"] = _median_us(read, passes, n)
    stages["PIL decode (full, from bytes)"] = _median_us(decode_full, passes, n)
    stages["PIL decode with draft() (crop-aware DCT scale)"] = _median_us(decode_draft_crop_aware, passes, n)
    stages["PIL decode with draft() forced 1/2 (reference)"] = _median_us(decode_draft_half, passes, n)
    stages["Image.open(path)+convert (loader's exact read+decode)"] = _median_us(decode_open_convert_path, passes, n)
    stages["per-sample seeding (fork_rng + 3 seeds)"] = _median_us(seeding, passes, n)
    stages["  of which torch.manual_seed"] = _median_us(seed_torch_only, passes, n)
    stages["  of which random/np getstate+setstate"] = _median_us(py_np_state_save_restore, passes, n)
    stages["RandomResizedCrop param draw (+RandomChoice pick)"] = _median_us(param_draw, passes, n)
    stages["crop+resize PIL bilinear (antialias)"] = _median_us(crop_resize(InterpolationMode.BILINEAR), passes, n)
    stages["crop+resize PIL bicubic (antialias)"] = _median_us(crop_resize(InterpolationMode.BICUBIC), passes, n)
    stages["hflip (PIL, per flipped image)"] = _median_us(flip, passes, n)
    stages["PILToTensor (uint8 CHW)"] = _median_us(to_tensor, passes, n)
    stages["collate -> [64,3,224,224]"] = _median_us(collate, passes, nb * BATCH)
    stages["DeviceNormalize on CPU (uint8->fp32)"] = _median_us(normalize, passes, nb * BATCH)
    stages["  normalise into a preallocated buffer (variant)"] = _median_us(normalize_prealloc, passes, nb * BATCH)
    stages["v2 Compose whole transform (on decoded PIL)"] = _median_us(full_transform, passes, n)
    scales = np.array(draft_scales)

    # the stage sum as the loader runs it: random filter (half each), flip half the time
    model = {
        "file read": stages["file read"],
        "PIL decode (full)": stages["PIL decode (full, from bytes)"],
        "per-sample seeding": stages["per-sample seeding (fork_rng + 3 seeds)"],
        "RRC param draw": stages["RandomResizedCrop param draw (+RandomChoice pick)"],
        "crop+resize (mean of bilinear, bicubic)": 0.5 * (stages["crop+resize PIL bilinear (antialias)"]
                                                          + stages["crop+resize PIL bicubic (antialias)"]),
        "hflip (x0.5)": 0.5 * stages["hflip (PIL, per flipped image)"],
        "PILToTensor": stages["PILToTensor (uint8 CHW)"],
        "collate": stages["collate -> [64,3,224,224]"],
        "DeviceNormalize (CPU)": stages["DeviceNormalize on CPU (uint8->fp32)"],
    }

    # end to end: the real loader, workers=0, one warm-up epoch then the median of `passes`
    loader = pipelines.build_loader(cfg, img_size=IMG, batch_size=BATCH, seed=seed, device="cpu")
    # only the first n images: the loader reads the whole tree; rate per image delivered is what compares
    e2e = [1e6 / r for r in epoch_rates(loader, passes)]
    return {
        "images": n,
        "stages_us": {k: round(v, 1) for k, v in stages.items()},
        "model_us": {k: round(v, 1) for k, v in model.items()},
        "model_sum_us": round(sum(model.values()), 1),
        "e2e_loader_us": round(statistics.median(e2e), 1),
        "e2e_loader_us_passes": [round(x, 1) for x in e2e],
        "e2e_images_per_epoch": len(loader) * BATCH,  # whole batches only (drop_last)
        "tree_images": loader.num_samples,
        "mean_source_size": [round(float(np.mean([s[0] for s in sizes])), 1), round(float(np.mean([s[1] for s in sizes])), 1)],
        "mean_crop_side_px": round(float(np.mean([np.sqrt(p["height"] * p["width"]) for p in params])), 1),
        "draft_crop_aware_scale_hist": {str(int(s)): int((scales == s).sum()) for s in np.unique(scales)},
    }


def profile_ffcv(beton: str, passes: int, seed: int = 0) -> dict:
    from pipelines.base import torch_threads_kept

    import pipelines
    from pipelines.config import PipelineConfig

    with torch_threads_kept():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                           SimpleRGBImageDecoder)
        from ffcv.loader import Loader as FFCVLoader
        from ffcv.loader import OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor
    import pipelines.ffcv_loader  # noqa: F401  (its Compiler patch: numba threads only)

    cfg = PipelineConfig(backend="ffcv", path=beton, workers=1, interpolation="bilinear")

    def epochs(make):
        try:
            loader = make()
            per = [1e6 / r for r in epoch_rates(loader, passes, count=lambda b: len(b) if hasattr(b, "images")
                                                 else b[0].shape[0])]
            return {"us": round(statistics.median(per), 1), "passes": [round(x, 1) for x in per]}
        except Exception as err:  # SimpleRGBImageDecoder refuses variable-size images
            return {"error": f"{type(err).__name__}: {str(err)[:200]}"}

    def raw(image_ops):
        return lambda: FFCVLoader(beton, batch_size=BATCH, num_workers=1, os_cache=True, order=OrderOption.SEQUENTIAL,
                                  seed=seed, drop_last=True, batches_ahead=2,
                                  pipelines={"image": image_ops, "label": [IntDecoder(), ToTensor(), Squeeze(1)]})

    rrc = lambda: RandomResizedCropRGBImageDecoder((IMG, IMG), scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio))
    out = {}
    with torch_threads_kept():
        out["SimpleRGBImageDecoder (decode only)"] = epochs(raw([SimpleRGBImageDecoder()]))
        out["CenterCropRGBImageDecoder ratio 1 -> 224 (decode + minimal resize)"] = epochs(
            raw([CenterCropRGBImageDecoder((IMG, IMG), ratio=1.0)]))
        out["RandomResizedCropRGBImageDecoder alone"] = epochs(raw([rrc()]))
        out["RRC decoder + RandomHorizontalFlip"] = epochs(raw([rrc(), RandomHorizontalFlip(cfg.hflip)]))
        out["FfcvLoader (real, workers=1: + ToTensor, ToTorchImage, DeviceNormalize)"] = epochs(
            lambda: pipelines.build_loader(cfg, img_size=IMG, batch_size=BATCH, seed=seed, device="cpu"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tree", help="class-folder tree of JPEGs")
    ap.add_argument("--beton", help="the same tree as a .beton (fastvit convert); profiles FFCV too")
    ap.add_argument("--n", type=int, default=2000, help="images per pass (default 2000)")
    ap.add_argument("--passes", type=int, default=3, help="timed passes after one warm-up (median reported)")
    ap.add_argument("--skip-torchvision", action="store_true")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {"tree": a.tree, "beton": a.beton, "passes": a.passes, "torch_threads": torch.get_num_threads()}
    if not a.skip_torchvision:
        res["torchvision"] = profile_torchvision(a.tree, a.n, a.passes)
    if a.beton:
        res["ffcv"] = profile_ffcv(a.beton, a.passes)
    res["torch_threads_after"] = torch.get_num_threads()
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
