"""NVIDIA DALI backend: the only file that imports nvidia.dali.

On a GPU, JPEGs are decoded by nvJPEG (device="mixed", with `hw_decoder_load` of them on the hardware
decoder) and cropped, resized and flipped on the GPU; without one (device_id=None) the same graph runs on
CPU operators. The pipeline is built once per loader: each epoch, its source hands DALI this rank's shard
from `shard_indices` (seed, epoch), batch by batch, in that order (the same disjoint, equal, per-epoch
reshuffled shards as every other backend), and the random operators are put back to the epoch's own stream,
so epoch e's batches are a function of (seed, epoch, rank) whatever ran before: a resumed run sees them exactly.

DALI stops at the first undecodable file. A truncated image is reported by name (DecodeError); a file cut
inside its JPEG header makes DALI 2.4.0 abandon the pipeline without naming it, and can crash the process.
Feed it trees that have been validated (or use the torchvision backend to find the file).

Multi-view batches: each file is read once and every view is its own output, ROI-decoded by its own
image_random_crop (decoding a view's window only, per view, instead of the whole image once). DALI's crops are
not keyed: each view's random operators draw from their own Philox streams, moved per epoch like view 0's (see
_epoch_rng_state); the photometric ops, which run after DALI (pipelines.photometric), are keyed as everywhere.
"""
from __future__ import annotations

import re
import weakref
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from nvidia.dali import __version__ as _DALI_VERSION
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.backend import TensorGPU
from nvidia.dali.plugin.pytorch import feed_ndarray

from .base import (
    Batch,
    DecodeError,
    DeviceNormalize,
    HostView,
    Loader,
    LoaderArgs,
    batches_per_epoch,
    sample_seed,
    sample_seeds,
    shard_indices,
)
from .config import EVAL_CROP_RATIO, PipelineConfig, ViewConfig, parse_randaugment
from .folder import scan_folder

_FILTERS = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
# headers read for nvJPEG's preallocation hint: a hint, not a bound (a larger image costs one reallocation),
# so an evenly spaced sample serves; reading all 1.28M ImageNet headers would cost minutes per rank
_HINT_FILES = 1024


def _largest_header(paths: Sequence[str], limit: int = _HINT_FILES) -> Tuple[int, int]:
    """(width, height) covering the largest of up to `limit` evenly spaced files; PIL reads only headers."""
    from PIL import Image

    w = h = 0
    for p in paths[:: max(1, len(paths) // limit)]:
        try:
            with Image.open(p) as im:
                w, h = max(w, im.width), max(h, im.height)
        except OSError:  # DALI names a bad file when it decodes it
            continue
    return w, h


def _decoder_args(cfg: PipelineConfig, gpu: bool, hint: Optional[Tuple[int, int]]) -> dict:
    decoder = dict(device="mixed" if gpu else "cpu", output_type=types.RGB)
    if gpu:
        # the hardware decoder preallocates its share of the batch at this size, once, at build: sized to the
        # data, not to ImageNet's largest image (5980 x 6430 RGB is 115 MB a sample, ~7 GB at batch 64)
        decoder.update(hw_decoder_load=cfg.dali_hw_decoder_load)
        if hint and hint[0] and hint[1]:
            decoder.update(preallocate_width_hint=hint[0], preallocate_height_hint=hint[1])
    return decoder


def _graph(paths, cfg: PipelineConfig, views: Sequence[ViewConfig], train: bool, gpu: bool,
           hint: Optional[Tuple[int, int]]):
    """paths (encoded file names) -> read -> per view: decode (+ random crop) -> resize -> flip -> uint8 CHW."""
    jpegs = fn.io.file.read(paths)  # DALI's threads read the files; the Python source only names them
    decoder = _decoder_args(cfg, gpu, hint)
    if train:
        # DALI's crops are not keyed (per-sample keys exist only for the photometric ops): each view's random
        # operators draw from their own Philox streams, moved per epoch like view 0's. Views are built one after
        # the other, so view 0's operators are created first and keep the seeds a single-view graph gives them
        return tuple(_train_view(jpegs, cfg, v, decoder) for v in views)
    imgs = fn.decoders.image(jpegs, **decoder)
    return tuple(_eval_view(imgs, v.size, cfg.crop_pct) for v in views)


def _train_view(jpegs, cfg: PipelineConfig, view: ViewConfig, decoder: dict):
    # with device="mixed" this is nvJPEG ROI decoding: only the crop window is decoded ("When possible,
    # the operator uses the ROI decoding, reducing the decoding time and memory consumption", DALI docs,
    # fn.decoders.image_random_crop); a separate decode + crop would decode the whole image
    imgs = fn.decoders.image_random_crop(
        jpegs, random_area=list(view.crop_scale), random_aspect_ratio=list(view.crop_ratio), num_attempts=10, **decoder
    )
    if cfg.interpolation == "random":  # a filter drawn per sample, as mae-lite's RandomResizedCropAndInterpolation
        pick = fn.random.choice([int(_FILTERS["bilinear"]), int(_FILTERS["bicubic"])])
        interp = fn.cast(pick, dtype=types.INTERP_TYPE)
    else:
        interp = _FILTERS[cfg.interpolation]
    imgs = fn.resize(imgs, resize_x=view.size, resize_y=view.size, interp_type=interp, antialias=True)
    mirror = fn.random.coin_flip(probability=view.hflip)
    if cfg.randaugment:  # timm's m0..m10 scale = DALI's magnitude bins 0..10
        from nvidia.dali.auto_aug import rand_augment

        n, m = parse_randaugment(cfg.randaugment)
        imgs = fn.flip(imgs, horizontal=mirror)
        imgs = rand_augment.rand_augment(imgs, n=n, m=m, num_magnitude_bins=11)
        mirror = 0
    return fn.crop_mirror_normalize(imgs, dtype=types.UINT8, output_layout="CHW", mirror=mirror)


def _eval_view(imgs, img_size: int, crop_pct: float = EVAL_CROP_RATIO):
    imgs = fn.resize(imgs, resize_shorter=int(round(img_size / crop_pct)), interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(imgs, dtype=types.UINT8, output_layout="CHW", crop=(img_size, img_size))


class _EpochSource:
    """The external source: batch i of the current epoch's file names. DALI calls it up to
    prefetch_queue_depth batches ahead of the consumer; StopIteration ends DALI's epoch."""

    def __init__(self):
        self.batches: List[List[str]] = []

    def __call__(self, info):
        if info.iteration >= len(self.batches):
            raise StopIteration
        return [np.frombuffer(p.encode(), dtype=np.uint8) for p in self.batches[info.iteration]]


# a random operator's state in a DALI checkpoint: Philox_<key>_<sample counter>:<draw counter>_<phase>
_PHILOX_START = re.compile(rb"(Philox_[0-9A-F]{16}_)0{16}(?=:0{16}_0)")


def _epoch_rng_state(fresh: bytes, epoch: int) -> Tuple[bytes, int]:
    """The built pipeline's checkpoint with every Philox stream moved to epoch's block of 2^32 samples:
    same keys, disjoint counters, so epochs draw independent streams and epoch e's never depends on what
    ran before. Same length as `fresh` (fixed-width hex), so the protobuf framing stays valid."""
    return _PHILOX_START.subn(lambda m: m.group(1) + b"%016X" % (epoch << 32), fresh)


class DaliLoader(Loader):
    def __init__(self, cfg: PipelineConfig, a: LoaderArgs):
        self.cfg, self.img_size, self.batch_size, self.train = cfg, a.img_size, a.batch_size, a.train
        self.rank, self.world_size, self.seed, self.shuffle, self.drop_last = a.rank, a.world_size, a.seed, a.shuffle, a.drop_last
        self.samples, self.classes = scan_folder(cfg.path)
        self.num_samples = len(self.samples)
        self.views = a.view_list(cfg)
        self.to_device = DeviceNormalize(cfg.mean, cfg.std, a.device, a.dtype, a.photometric_stages(self.views))
        self.gpu = self.to_device.device.type == "cuda"
        self.epoch = 0
        self._source = _EpochSource()
        self._pipe = None  # built on first use, then kept for every epoch (rebuilt only after DALI fails)
        self._fresh_rng = b""
        self._running = None  # weakref to the epoch generator that owns the pipeline

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.world_size, self.batch_size, self.drop_last)

    def epoch_indices(self):
        return shard_indices(self.num_samples, self.rank, self.world_size, self.seed, self.epoch, self.shuffle).tolist()

    def _pipeline(self):
        if self._pipe is not None:
            return self._pipe
        hint = _largest_header([p for p, _ in self.samples]) if self.gpu else None
        source = self._source

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=max(1, self.cfg.workers),
            device_id=self.to_device.device.index or 0 if self.gpu else None,
            seed=sample_seed(self.seed, 0, self.rank) % 2**31,  # the Philox keys; epochs pick counter blocks
            prefetch_queue_depth=max(1, self.cfg.prefetch_factor),
            enable_conditionals=bool(self.cfg.randaugment),  # DALI's RandAugment picks its ops with `if`
            enable_checkpointing=True,  # the random operators' states, rewound per epoch in _start_epoch
        )
        def pipe():
            paths = fn.external_source(source=source, batch=True, batch_info=True, dtype=types.UINT8, ndim=1)
            return _graph(paths, self.cfg, self.views, self.train, self.gpu, hint)

        p = pipe()
        p.build()
        self._fresh_rng = p.checkpoint()  # before any draw
        self._pipe = p
        return p

    def _start_epoch(self, pipe) -> None:
        state, streams = _epoch_rng_state(self._fresh_rng, self.epoch)
        if self.train and not streams:
            raise RuntimeError(
                f"DALI {_DALI_VERSION} checkpoints hold no Philox state this loader knows how to move per epoch; "
                "its augmentations would repeat every epoch (use data.backend=torchvision, or DALI 2.4)"
            )
        if streams:
            # DALI's public API restores a checkpoint only when building; the backend call does the same on
            # the built pipeline, between epochs (nothing in flight), without rebuilding its decoders
            pipe._pipe.RestoreFromSerializedCheckpoint(state)

    def _end_epoch(self, pipe) -> None:
        """Stop feeding and take back what DALI already prefetched (up to prefetch_queue_depth batches),
        so that the next epoch starts on an empty queue; after DALI fails the pipeline is rebuilt instead."""
        self._source.batches = []
        if pipe is not self._pipe:
            return
        try:
            while True:
                pipe.run()
        except StopIteration:
            pipe.reset()
        except RuntimeError:  # a bad file in batches nobody asked for: the next epoch rebuilds
            self._pipe = None

    def __iter__(self) -> Iterator[Batch]:
        running = self._running and self._running()
        if running is not None:
            running.close()  # one pipeline, one epoch at a time: drains the abandoned one
        epoch = self._epoch()
        self._running = weakref.ref(epoch)
        return epoch

    def _epoch(self) -> Iterator[Batch]:
        idx = self.epoch_indices()
        n, bs = len(self), self.batch_size
        keys = sample_seeds(self.seed, self.epoch, idx)
        labels = torch.tensor([self.samples[i][1] for i in idx], dtype=torch.int64)
        pipe = self._pipeline()
        self._start_epoch(pipe)
        self._source.batches = [[self.samples[i][0] for i in idx[b * bs : (b + 1) * bs]] for b in range(n)]
        try:
            for b in range(n):
                try:
                    outs = pipe.run()
                except RuntimeError as err:  # DALI reports a bad file inside a long C++ message
                    self._pipe = None  # "Current pipeline object is no longer valid"
                    raise _decode_error(err, self._source.batches[b]) from None
                # outside the try: a CUDA error in the copy or normalisation is not a decode error
                images = [_to_torch(out.as_tensor()) for out in outs]  # before the next run() recycles DALI's buffers
                rows = slice(b * bs, b * bs + images[0].shape[0])
                if len(images) == 1:
                    yield self.to_device(images[0], labels[rows], keys[rows])
                else:
                    yield self.to_device(images[0], labels[rows], keys[rows],
                                         more_views=[HostView(x) for x in images[1:]])
        finally:
            self._end_epoch(pipe)


def _to_torch(t) -> torch.Tensor:
    """DALI TensorCPU/TensorGPU [N, C, H, W] uint8 -> a torch tensor on the same device (a copy)."""
    gpu = isinstance(t, TensorGPU)
    device = torch.device("cuda", t.device_id()) if gpu else torch.device("cpu")
    dst = torch.empty(t.shape(), dtype=torch.uint8, device=device)
    # on the consumer's stream, so later torch work on dst is ordered after the copy
    feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(device) if gpu else None)
    return dst


_FAILED_SAMPLE = re.compile(r"Failed to decode sample #(\d+) : ?(.*)")


def _decode_error(err: RuntimeError, batch_paths: Sequence[str]) -> RuntimeError:
    """DALI's "Critical error in pipeline" message names the sample on one line: by its source file where
    DALI knows it, else by its place in the failing batch (DALI 2.4 reports errors with their iteration)."""
    found = _FAILED_SAMPLE.search(str(err))
    if found:
        i, name = int(found.group(1)), found.group(2).strip()
        if not name and i < len(batch_paths):
            name = batch_paths[i]
        if name:
            return DecodeError(f"cannot decode image {name} (dali decoder)")
    return DecodeError(f"dali pipeline failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}")
