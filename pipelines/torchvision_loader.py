"""The reference ("peer") pipeline: torchvision ImageFolder + PIL decoding in DataLoader workers, with
mae-lite's pre-training augmentation. Every faster backend is measured against this one."""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from .base import (
    Batch,
    DeviceNormalize,
    EpochShardSampler,
    HostView,
    Loader,
    LoaderArgs,
    batches_per_epoch,
    sample_seed,
    view_key,
)
from .config import EVAL_CROP_RATIO, PipelineConfig, ViewConfig
from .folder import open_rgb, scan_folder

_FILTERS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with PIL's old meaning of 0 bits (a black image): at magnitude 10 timm's
    PosterizeIncreasing keeps 0 bits, which Pillow >= 11 refuses ("bits must be between or equal to 1 and 8")."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(cfg: PipelineConfig, img_size: int, view: Optional[ViewConfig] = None) -> v2.Transform:
    """RandomResizedCrop (scale, ratio, bilinear/bicubic/random filter) + horizontal flip -> uint8 CHW.
    view: a resolved ViewConfig (config.resolve_views) whose crop ranges and flip replace cfg's."""
    scale, ratio, hflip = (cfg.crop_scale, cfg.crop_ratio, cfg.hflip) if view is None else (
        view.crop_scale, view.crop_ratio, view.hflip)
    filters = list(_FILTERS) if cfg.interpolation == "random" else [cfg.interpolation]
    crops = [
        v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio, interpolation=_FILTERS[f], antialias=True)
        for f in filters
    ]
    ops = [crops[0] if len(crops) == 1 else v2.RandomChoice(crops), v2.RandomHorizontalFlip(hflip)]
    if cfg.randaugment:  # timm's own RandAugment on the PIL crop, as timm's create_transform orders it
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * x) for x in cfg.mean)}
        ra = rand_augment_transform(cfg.randaugment, hparams)
        for op in ra.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
        ops.append(ra)
    return v2.Compose(ops + [v2.PILToTensor()])


def eval_transform(img_size: int, crop_pct: float = EVAL_CROP_RATIO) -> v2.Transform:
    """Resize the short side to img_size / crop_pct (256 for 224 at 0.875), then center-crop img_size."""
    return v2.Compose(
        [
            v2.Resize(int(round(img_size / crop_pct)), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.PILToTensor(),
        ]
    )


class FolderDataset(torch.utils.data.Dataset):
    """Indexed by (index, epoch) -> (uint8 image, label, key); the sample's augmentation is seeded from its key,
    `sample_seed(seed, epoch, index)`, which also travels with it in the Batch.

    transform may be a list, one transform per view: the item is then (tuple of uint8 views, label, key), view v
    seeded from view_key(key, v) (the DataLoader's collation keeps the views apart, one batch tensor each)."""

    def __init__(self, root: str | Path, transform, seed: int):
        self.samples, self.classes = scan_folder(root)
        self.transform, self.seed = transform, seed
        self.views: Sequence = transform if isinstance(transform, (list, tuple)) else [transform]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Tuple[int, int]):
        index, epoch = key
        path, label = self.samples[index]
        img = open_rgb(path)
        # v2 transforms draw from torch's RNG, timm's RandAugment from python's and numpy's; reseeding all three
        # pins them to the sample. In a worker they are private; in the main process (workers=0) they are the
        # training's, so they are put back afterwards instead of clobbered.
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state())
        seed = sample_seed(self.seed, epoch, index)
        with contextlib.nullcontext() if in_worker else torch.random.fork_rng(devices=[]):
            try:
                out = []
                for v, transform in enumerate(self.views):
                    # the key's 64 bits as an unsigned seed (a view key may be negative, and python's random.seed
                    # would take |key|); view 0's key is the sample's own, >= 0: seeded exactly as before views
                    s = view_key(seed, v) % 2**64
                    torch.manual_seed(s)
                    random.seed(s)
                    np.random.seed(s % 2**32)
                    out.append(transform(img))
                return (tuple(out) if self.views is self.transform else out[0]), label, seed
            finally:
                if saved is not None:
                    random.setstate(saved[0])
                    np.random.set_state(saved[1])


class TorchvisionLoader(Loader):
    def __init__(self, cfg: PipelineConfig, a: LoaderArgs):
        views = a.view_list(cfg)
        transforms = [train_transform(cfg, v.size, v) if a.train else eval_transform(v.size, cfg.crop_pct) for v in views]
        self.dataset = FolderDataset(cfg.path, transforms, a.seed)
        self.classes, self.num_samples = self.dataset.classes, len(self.dataset)
        self.sampler = EpochShardSampler(len(self.dataset), a.rank, a.world_size, a.seed, shuffle=a.shuffle)
        self.batch_size, self.drop_last = a.batch_size, a.drop_last
        workers = cfg.workers
        self.to_device = DeviceNormalize(cfg.mean, cfg.std, a.device, a.dtype, a.photometric_stages(views))
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=a.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=cfg.pin_memory and self.to_device.device.type == "cuda",
            drop_last=a.drop_last,
            persistent_workers=workers > 0,
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
            # a private generator: creating the iterator must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(a.seed),
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def epoch_indices(self):
        return [i for i, _ in self.sampler]

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.sampler.world_size, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        for views, labels, keys in self.loader:
            yield self.to_device(views[0], labels, keys, more_views=[HostView(x) for x in views[1:]])
