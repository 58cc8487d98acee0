"""NVIDIA DALI backend: the only file that imports nvidia.dali.

On a GPU, JPEGs are decoded by nvJPEG (device="mixed", with `hw_decoder_load` of them on the hardware
decoder) and cropped, resized and flipped on the GPU; without one (device_id=None) the same graph runs on
CPU operators. Each epoch's pipeline reads this rank's shard from `shard_indices` (seed, epoch): the same
disjoint, equal, per-epoch-reshuffled shards as every other backend, and an exact data order on resume.

DALI stops at the first undecodable file. A truncated image is reported by name (DecodeError); a file cut
inside its JPEG header makes DALI 2.4.0 abandon the pipeline without naming it, and can crash the process.
Feed it trees that have been validated (or use the torchvision backend to find the file).
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .base import (
    Batch,
    DecodeError,
    DeviceNormalize,
    Loader,
    LoaderArgs,
    batches_per_epoch,
    sample_seed,
    sample_seeds,
    shard_indices,
)
from .config import PipelineConfig, parse_randaugment
from .folder import scan_folder

_FILTERS = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
# the largest ImageNet image (5980 x 6430): nvJPEG preallocates for it instead of reallocating mid-epoch
_PREALLOC_W, _PREALLOC_H = 5980, 6430


def _graph(files, labels, cfg: PipelineConfig, img_size: int, train: bool, gpu: bool):
    """One epoch's DALI graph: read -> decode (+ random crop) -> resize -> flip -> uint8 CHW."""
    jpegs, lab = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
    decoder = dict(device="mixed" if gpu else "cpu", output_type=types.RGB)
    if gpu:
        decoder.update(hw_decoder_load=cfg.dali_hw_decoder_load, preallocate_width_hint=_PREALLOC_W,
                       preallocate_height_hint=_PREALLOC_H)
    if train:
        imgs = fn.decoders.image_random_crop(
            jpegs, random_area=list(cfg.crop_scale), random_aspect_ratio=list(cfg.crop_ratio), num_attempts=10, **decoder
        )
        if cfg.interpolation == "random":  # a filter drawn per sample, as mae-lite's RandomResizedCropAndInterpolation
            pick = fn.random.choice([int(_FILTERS["bilinear"]), int(_FILTERS["bicubic"])])
            interp = fn.cast(pick, dtype=types.INTERP_TYPE)
        else:
            interp = _FILTERS[cfg.interpolation]
        imgs = fn.resize(imgs, resize_x=img_size, resize_y=img_size, interp_type=interp, antialias=True)
        mirror = fn.random.coin_flip(probability=cfg.hflip)
        if cfg.randaugment:  # timm's m0..m10 scale = DALI's magnitude bins 0..10
            from nvidia.dali.auto_aug import rand_augment

            n, m = parse_randaugment(cfg.randaugment)
            imgs = fn.flip(imgs, horizontal=mirror)
            imgs = rand_augment.rand_augment(imgs, n=n, m=m, num_magnitude_bins=11)
            mirror = 0
        return fn.crop_mirror_normalize(imgs, dtype=types.UINT8, output_layout="CHW", mirror=mirror), lab
    imgs = fn.decoders.image(jpegs, **decoder)
    imgs = fn.resize(imgs, resize_shorter=int(round(img_size / 0.875)), interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(imgs, dtype=types.UINT8, output_layout="CHW", crop=(img_size, img_size)), lab


class DaliLoader(Loader):
    def __init__(self, cfg: PipelineConfig, a: LoaderArgs):
        self.cfg, self.img_size, self.batch_size, self.train = cfg, a.img_size, a.batch_size, a.train
        self.rank, self.world_size, self.seed, self.shuffle, self.drop_last = a.rank, a.world_size, a.seed, a.shuffle, a.drop_last
        self.samples, self.classes = scan_folder(cfg.path)
        self.num_samples = len(self.samples)
        self.to_device = DeviceNormalize(cfg.mean, cfg.std, a.device, a.dtype)
        self.gpu = self.to_device.device.type == "cuda"
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.world_size, self.batch_size, self.drop_last)

    def epoch_indices(self):
        return shard_indices(self.num_samples, self.rank, self.world_size, self.seed, self.epoch, self.shuffle).tolist()

    def _iterator(self, idx) -> DALIGenericIterator:
        files = [self.samples[i][0] for i in idx]
        labels = [self.samples[i][1] for i in idx]

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=max(1, self.cfg.workers),
            device_id=self.to_device.device.index or 0 if self.gpu else None,
            seed=sample_seed(self.seed, self.epoch, self.rank) % 2**31,
            prefetch_queue_depth=max(1, self.cfg.prefetch_factor),
            enable_conditionals=bool(self.cfg.randaugment),  # DALI's RandAugment picks its ops with `if`
        )
        def pipe():
            return _graph(files, labels, self.cfg, self.img_size, self.train, self.gpu)

        p = pipe()
        p.build()
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        return DALIGenericIterator(p, ["images", "labels"], reader_name="Reader", last_batch_policy=policy)

    def __iter__(self) -> Iterator[Batch]:
        it = None
        idx = self.epoch_indices()
        keys = sample_seeds(self.seed, self.epoch, idx)  # the reader keeps file order: batch b is keys[bB:(b+1)B]
        try:
            it = self._iterator(idx)  # DALI prefetches here: a bad file can fail the constructor already
            for b, out in enumerate(it):
                images = out[0]["images"]
                k = keys[b * self.batch_size : b * self.batch_size + images.shape[0]]
                yield self.to_device(images, out[0]["labels"].view(-1), k)
        except RuntimeError as err:  # DALI reports a bad file inside a long C++ message
            raise _decode_error(err) from None
        finally:
            del it


_FAILED_SAMPLE = re.compile(r"Failed to decode sample #\d+ : (.+)")


def _decode_error(err: RuntimeError) -> RuntimeError:
    """DALI's "Critical error in pipeline" message names the file on one line; lift it out."""
    found = _FAILED_SAMPLE.search(str(err))
    if found:
        return DecodeError(f"cannot decode image {found.group(1).strip()} (dali decoder)")
    return DecodeError(f"dali pipeline failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}")
