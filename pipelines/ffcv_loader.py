"""FFCV backend: reads a .beton written by pipelines/beton.py (or any FFCV file with an RGBImageField
"image" and an IntField "label"). The only file that imports ffcv's loader.

Order: FFCV's RANDOM order shards through torch's DistributedSampler, which pads the last shard with
repeated samples; instead this loader puts `shard_indices` in its place: the same disjoint, equal,
per-epoch-reshuffled shards as every other backend (and QUASI_RANDOM, which has no distributed support,
is not used). Augmentation: FFCV's RandomResizedCrop decoder samples scale and ratio like torchvision but
always resizes with cv2.INTER_AREA, so data.interpolation has no effect here; its random draws come from
numba's per-thread generators, which FFCV does not seed, so augmentations are not reproducible run to run
(the data order is).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator, List

import numba
import torch

from .base import Batch, DeviceNormalize, Loader, LoaderArgs, sample_seeds, shard_indices, torch_threads_kept
from .beton import manifest_path
from .config import PipelineConfig

with torch_threads_kept():  # importing ffcv sets torch's thread count to 1
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader as FFCVLoader
    from ffcv.loader import OrderOption
    from ffcv.pipeline.compiler import Compiler
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage


def _numba_threads_only(cls, n: int) -> None:
    """FFCV's Compiler.set_num_threads minus its torch.set_num_threads(n): FFCV calls it when a loader is built
    and from its batch thread at every epoch, and torch's count is process-wide (MKL), so data.workers=1 put
    training's matrix multiplies on one core (demo: 100-130 img/s instead of 160+ measured here)."""
    cls.num_threads = n if n >= 1 else (os.cpu_count() or 1)
    numba.set_num_threads(cls.num_threads)


Compiler.set_num_threads = classmethod(_numba_threads_only)


class _ShardOrder(TraversalOrder):
    def __init__(self, loader, rank: int, world_size: int, seed: int, shuffle: bool):
        super().__init__(loader)
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed

    def sample_order(self, epoch: int):
        idx = shard_indices(len(self.indices), self.rank, self.world_size, self.seed, epoch, self.shuffle).numpy()
        return self.indices[idx]


class FfcvLoader(Loader):
    def __init__(self, cfg: PipelineConfig, a: LoaderArgs):
        path = Path(cfg.path)
        if not path.is_file():
            raise FileNotFoundError(
                f"data.backend=ffcv reads a .beton file, and {path} is not one; make it with: fastvit convert SRC {path}"
            )
        if a.train and cfg.randaugment:
            raise ValueError(f"data.randaugment={cfg.randaugment!r}: FFCV has no RandAugment; use data.backend=torchvision "
                             "or dali for fine-tuning with it")
        if a.train and cfg.interpolation != "bilinear":
            warnings.warn(f"data.interpolation={cfg.interpolation} has no effect on the ffcv backend: FFCV's "
                          "RandomResizedCrop decoder always resizes with cv2.INTER_AREA", stacklevel=3)
        if a.train:
            decoder = RandomResizedCropRGBImageDecoder((a.img_size, a.img_size), scale=tuple(cfg.crop_scale),
                                                       ratio=tuple(cfg.crop_ratio))
            image_ops: List = [decoder, RandomHorizontalFlip(cfg.hflip)]
        else:
            image_ops = [CenterCropRGBImageDecoder((a.img_size, a.img_size), ratio=0.875)]
        image_ops += [ToTensor(), ToTorchImage(channels_last=False)]
        self.loader = FFCVLoader(
            str(path),
            batch_size=a.batch_size,
            num_workers=max(1, cfg.workers),
            os_cache=cfg.ffcv_os_cache,
            order=OrderOption.SEQUENTIAL,
            seed=a.seed,
            drop_last=a.drop_last,
            batches_ahead=max(1, cfg.prefetch_factor),
            pipelines={"image": image_ops, "label": [IntDecoder(), ToTensor(), Squeeze(1)]},
        )
        # FFCV 1.0.2 cannot take a custom order class through its constructor (it checks isinstance, then
        # calls the instance); it reads the order from this attribute at every epoch, so set it here
        self.loader.traversal_order = _ShardOrder(self.loader, a.rank, a.world_size, a.seed, a.shuffle)
        self.loader.first_traversal_order = self.loader.traversal_order.sample_order(0)
        self.num_samples = int(self.loader.reader.num_samples)
        self.classes = _classes(path)
        self.to_device = DeviceNormalize(cfg.mean, cfg.std, a.device, a.dtype)
        self.seed, self.epoch = a.seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self):
        return [int(i) for i in self.loader.traversal_order.sample_order(self.epoch)]

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        # FFCV counts epochs itself (+1 per iteration started); set_epoch decides here, as in every backend
        self.loader.next_epoch = self.epoch
        # SEQUENTIAL over our order: batch b holds the samples order[bB:(b+1)B], whatever the worker count
        keys = sample_seeds(self.seed, self.epoch, self.epoch_indices())
        B = self.loader.batch_size
        for b, (images, labels) in enumerate(self.loader):
            yield self.to_device(images, labels, keys[b * B : b * B + images.shape[0]])


def _classes(path: Path) -> List[str]:
    """Class names from the converter's manifest; plain FFCV files have none, so indices stand in."""
    manifest = manifest_path(path)
    if manifest.is_file():
        return list(json.loads(manifest.read_text())["classes"])
    return []
