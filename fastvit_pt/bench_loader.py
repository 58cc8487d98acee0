"""`fastvit bench loader`: loader-only img/s of every backend delivering MAE pre-training batches, beside the
decode-only ceiling, in one run; and `tv-decode`, torchvision's own JPEG decoding on the device (batched nvJPEG
on a GPU), for machines that have neither DALI nor FFCV."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .bench import _sync, environment


def _decode_file(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return int(np.asarray(im.convert("RGB")).shape[0])


def decode_only(paths: Sequence[str], workers: int) -> float:
    """img/s of decoding `paths` at their stored size (PIL / libjpeg-turbo), no augmentation, in `workers`
    processes: the ceiling any loader on these cores could reach without a faster decoder."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_decode_file, paths, chunksize=16):
                pass
    else:
        for p in paths:
            _decode_file(p)
    return len(paths) / (time.perf_counter() - t0)


DEVICE_DECODE = "tv-decode"


class DeviceDecodeLoader:
    """`bench loader --backends tv-decode`: JPEG decoding on the device itself, what a GPU machine without DALI or
    FFCV still has. Per batch: the files' bytes read on the host (main process, no workers, no prefetch); one
    torchvision.io.decode_jpeg call on the whole list (batched nvJPEG on CUDA, libjpeg-turbo on the CPU); then per
    image, on the device, the reference's RandomResizedCrop (crop_scale, crop_ratio, bilinear or bicubic per
    sample, antialiased) and flip with transforms.v2.functional (sizes differ, so one image at a time: ~6 small
    kernels each); stacked and normalised there. Shuffled, whole batches only, as the other backends."""

    MEASURES = ("host file reads (one thread) + batched torchvision.io.decode_jpeg on the device + per-image "
                "RandomResizedCrop and flip on the device + normalisation to the compute dtype; no workers, no "
                "prefetch, no overlap with a model")

    def __init__(self, samples, cfg, img_size: int, batch: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0):
        from pipelines.base import DeviceNormalize

        bad = next((p for p, _ in samples if not p.lower().endswith((".jpg", ".jpeg"))), None)
        if bad:
            raise ValueError(f"bench loader: {DEVICE_DECODE} decodes JPEG files only; {bad} is not one")
        if len(samples) < batch:
            raise ValueError(f"bench loader: {DEVICE_DECODE} needs at least one batch of {batch} images, got {len(samples)}")
        self.samples, self.cfg, self.size, self.batch, self.seed = samples, cfg, img_size, batch, seed
        self.device, self.epoch = device, 0
        self.normalize = DeviceNormalize(cfg.mean, cfg.std, device, dtype)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from pipelines.base import DecodeError, sample_seeds, shard_indices
        from torchvision.io import ImageReadMode, decode_jpeg

        order = shard_indices(len(self.samples), 0, 1, self.seed, self.epoch, shuffle=True).tolist()
        for start in range(0, len(order) - self.batch + 1, self.batch):
            idx = order[start:start + self.batch]
            files = [torch.from_numpy(np.fromfile(self.samples[i][0], dtype=np.uint8)) for i in idx]
            try:
                images = decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as err:  # it names no file; the batch's first one narrows it down
                raise DecodeError(f"{DEVICE_DECODE}: decode_jpeg failed on a batch of {len(idx)} files, the first "
                                  f"{self.samples[idx[0]][0]}: {err}") from err
            keys = sample_seeds(self.seed, self.epoch, idx)
            with torch.random.fork_rng(devices=[]):  # per-sample draws; the process's RNG is left as it was
                crops = [self._augment(img, int(k)) for img, k in zip(images, keys)]
            yield self.normalize(torch.stack(crops), torch.tensor([self.samples[i][1] for i in idx]), keys)

    def _augment(self, img: torch.Tensor, key: int) -> torch.Tensor:
        """[3, H, W] uint8 -> [3, S, S] uint8 on img's device; the parameters are drawn on the host from `key`."""
        from torchvision.transforms import InterpolationMode, RandomResizedCrop
        from torchvision.transforms.v2 import functional as F

        c = self.cfg
        torch.manual_seed(key)
        top, left, h, w = RandomResizedCrop.get_params(img, list(c.crop_scale), list(c.crop_ratio))
        bicubic = c.interpolation == "bicubic" or (c.interpolation == "random" and bool(torch.rand(()) < 0.5))
        mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
        out = F.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=mode, antialias=True)
        return F.horizontal_flip(out) if bool(torch.rand(()) < c.hflip) else out


# bench-only names for a backend with a non-default setting, benchmarked beside the default in the same run
VARIANTS = {
    # FFCV's own RandomResizedCrop decoder (whole image, INTER_AREA whatever it is told): the stock reference
    "ffcv-stock": {"backend": "ffcv", "ffcv_decoder": "stock", "interpolation": "bilinear"},
}


def epoch_rates(loader, epochs: int, device: Optional[torch.device] = None, count: Callable = len,
                progress: Optional[Callable[[str], None]] = None, label: str = "loader") -> List[float]:
    """img/s of `epochs` timed epochs of `loader`, after one untimed warm-up epoch (worker start, file cache, DALI
    pipeline build). `count(batch)` is a batch's image count; a loader without set_epoch (a raw FFCV Loader)
    reads the same order each epoch; CUDA is synchronised before each epoch's clock is read."""
    rates = []
    for epoch in range(epochs + 1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        for b in loader:
            n += count(b)
        if device is not None:
            _sync(device)
        rate = n / (time.perf_counter() - t0)
        if epoch > 0:
            rates.append(rate)
        if progress:
            progress(f"{label} epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: {rate:.0f} img/s")
    return rates


def bench_loader(
    data: str,
    backends: Sequence[str] = ("torchvision", "dali"),
    beton: Optional[str] = None,
    workers: int = 2,
    batch: int = 64,
    img_size: int = 224,
    epochs: int = 3,
    device: str = "cpu",
    progress: Optional[Callable[[str], None]] = None,
    precision: str = "fp32",
) -> Dict:
    """Loader-only img/s per backend (MAE pre-training augmentation, batches delivered normalised on the
    device in `precision`): one warm-up epoch, then the median of `epochs` epochs; plus the decode-only
    ceiling, all in one run, so the ratios compare like with like. Backends: pipelines.BACKENDS, and
    DEVICE_DECODE (torchvision's own JPEG decoding on the device, no loader library)."""
    import pipelines
    from pipelines.folder import scan_folder

    from .engine.plan import DTYPES
    from .distributed.env import pick_device, resolve_precision

    dev = pick_device(device)
    precision = resolve_precision(precision, dev)
    known = (*pipelines.BACKENDS, *VARIANTS, DEVICE_DECODE)
    unknown = [b for b in backends if b not in known]
    if unknown:
        raise ValueError(f"bench loader: unknown backend {', '.join(unknown)}; expected some of {', '.join(known)}")
    samples, classes = scan_folder(data)
    results: Dict[str, Dict] = {}
    for backend in backends:
        # every loader draws bilinear/bicubic per sample (mae-lite), except where a variant says otherwise
        fields = {"backend": backend, "interpolation": "random", **VARIANTS.get(backend, {})}
        if fields["backend"] == "ffcv" and not beton:
            raise ValueError(f"bench loader: {backend} needs --beton FILE (made by `fastvit convert`)")
        cfg = pipelines.PipelineConfig(path=beton if fields["backend"] == "ffcv" else data, workers=workers, **fields)
        if backend == DEVICE_DECODE:
            loader = DeviceDecodeLoader(samples, cfg, img_size, batch, dev, DTYPES[precision])
        else:
            loader = pipelines.build_loader(cfg, img_size=img_size, batch_size=batch, seed=0, device=dev,
                                            dtype=DTYPES[precision])
        rates = epoch_rates(loader, epochs, dev, progress=progress, label=backend)
        results[backend] = {"img_per_s": round(statistics.median(rates), 1), "epochs_img_per_s": [round(r, 1) for r in rates]}
        if backend == DEVICE_DECODE:
            results[backend]["measures"] = DeviceDecodeLoader.MEASURES
        del loader
    paths = [p for p, _ in samples]
    decode_only(paths, workers)  # warm the page cache like the loaders' warm-up epochs
    ceiling = round(statistics.median(decode_only(paths, workers) for _ in range(epochs)), 1)
    ref = results.get("torchvision", {}).get("img_per_s")
    stock = results.get("ffcv-stock", {}).get("img_per_s")
    for r in results.values():
        r["ratio_vs_torchvision"] = round(r["img_per_s"] / ref, 2) if ref else None
        r["ratio_vs_ffcv_stock"] = round(r["img_per_s"] / stock, 2) if stock else None
        r["of_decode_only"] = round(r["img_per_s"] / ceiling, 2)
    return {
        "backends": results,
        "decode_only_img_per_s": ceiling,
        "decode_only": "PIL (libjpeg-turbo) decode at stored size to RGB, no augmentation, same worker count",
        "data": data,
        "beton": beton,
        "images": len(samples),
        "classes": len(classes),
        "workers": workers,
        "batch": batch,
        "img_size": img_size,
        "epochs": epochs,
        "precision": precision,
        "device": str(dev),
        "env": environment(dev),
    }
