"""The Batch contract every backend yields, and the pieces backends share.

Contract: `images` are [N, C, H, W] on the target device, in the compute dtype, already normalised;
`labels` are [N] int64 on the same device; `keys` are [N] int64 per-sample seeds, a function of
(seed, epoch, sample index) only, from which a method draws its per-sample randomness (MAE's masks), so that
a sample gets the same draws whatever the rank count, micro-batch size or backend. Backends move uint8 over the bus (4x fewer bytes than fp32)
and normalise on the device.

Multi-view batches (`build_loader(views=[ViewConfig, ...])`, for self-supervised methods): `images` is view 0 and
`more_views` holds views 1.. in order, one [N, C, h_v, w_v] tensor each (views of different sizes cannot share
a tensor); `Batch.views` lists them all. Sample i of every view is the same source image. View v's random draws
(crop, flip, filter; the photometric ops of `pipelines.photometric`) come from `view_key(key, v)`, so view 0 of a
multi-view loader is bit for bit what a single-view loader yields, and `keys` stays the samples' own keys.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch


class DecodeError(RuntimeError):
    """An image file could not be decoded; the message names the file."""


@dataclass
class Batch:
    images: torch.Tensor
    """[N, C, H, W] normalised, compute dtype, on the device."""
    labels: torch.Tensor
    """[N] int64 class indices, on the device."""
    keys: Optional[torch.Tensor] = None
    """[N] int64 per-sample seeds (`sample_seeds`), on the device; None where a source has no sample indices."""
    more_views: List[torch.Tensor] = field(default_factory=list)
    """Views 1.. of a multi-view batch, each [N, C, h_v, w_v] like `images`; empty for a single view."""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def views(self) -> List[torch.Tensor]:
        """[images, *more_views]: every view of the batch, view 0 first."""
        return [self.images, *self.more_views]


@dataclass
class HostView:
    """One more view of a batch as a backend hands it to DeviceNormalize: its own layout and ownership (a view
    with photometric ops arrives as uint8 while view 0 may arrive already normalised)."""

    images: torch.Tensor
    nhwc: bool = False
    borrowed: bool = False
    normalized: bool = False


class DeviceNormalize:
    """uint8 images on the host -> normalised Batch on the device.

    images are [N, C, H, W], or [N, H, W, C] with nhwc=True: a decoder writes pixels channels-last, and the
    transpose happens inside the normalisation's single pass (on the device), never as a host-side copy.
    borrowed=True: the host buffers belong to the backend, which refills them as soon as this returns (FFCV's
    ring of batch slots). On CUDA the copy then runs on a side stream and the host waits for that copy (not for
    the queued compute) before returning, so a refill can never race a copy still in flight; the compute
    stream waits on the copy stream instead of the host.

    photometric[v], where given and not None, is view v's photometric stage (`pipelines.photometric`): it runs on
    the device on the float 0..255 pixels, with view v's keys, right before the normalisation."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device, dtype: torch.dtype = torch.float32,
                 photometric: Sequence[Optional[Callable]] = ()):
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor([m * 255.0 for m in mean], device=self.device).view(1, -1, 1, 1)
        self.inv_std = torch.tensor([1.0 / (s * 255.0) for s in std], device=self.device).view(1, -1, 1, 1)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.photometric = list(photometric)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, keys: Optional[torch.Tensor] = None, *,
                 nhwc: bool = False, borrowed: bool = False, normalized: bool = False,
                 more_views: Sequence[HostView] = ()) -> Batch:
        views = [HostView(images, nhwc, borrowed, normalized), *more_views]
        for v, hv in enumerate(views):
            if hv.normalized:  # a decoder already wrote [N, C, H, W] in the compute dtype on the host (`host_output`)
                if self.copy_stream is not None or hv.images.dtype != self.dtype:
                    raise TypeError(f"normalised host batches are for a CPU device in {self.dtype}, got "
                                    f"{hv.images.dtype} for {self.device}")
                if self._stage(v) is not None:
                    raise TypeError(f"view {v} has photometric ops, which run before normalising: its decoder must "
                                    "hand uint8 (see pipelines.base.view_output)")
            elif hv.images.dtype != torch.uint8:
                raise TypeError(f"a pipeline must hand uint8 images to DeviceNormalize, got {hv.images.dtype}")
        if self.copy_stream is None:
            # copy=True: on the CPU an int64 .to() would alias a buffer the backend reuses; a Batch owns its memory
            xs = [hv.images for hv in views]
            y = labels.to(self.device, dtype=torch.int64, copy=True)
            k = None if keys is None else keys.to(self.device, dtype=torch.int64, copy=True)
        else:
            # not behind the queued compute: the copy stream starts at once (the caching allocator keeps a pool per
            # stream, so blocks compute freed are not handed to the copy; record_stream below guards the reverse)
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.copy_stream):
                xs = [hv.images.to(self.device, non_blocking=True) for hv in views]
                y = labels.to(self.device, dtype=torch.int64, non_blocking=True, copy=True)
                k = None if keys is None else keys.to(self.device, dtype=torch.int64, non_blocking=True, copy=True)
            copied = torch.cuda.Event(blocking=True)  # synchronize() sleeps instead of spinning a decoding core
            copied.record(self.copy_stream)
            compute.wait_event(copied)
            for t in (*xs, y, k):
                if t is not None:
                    t.record_stream(compute)  # allocated on the copy stream, used on the compute stream
            if any(hv.borrowed for hv in views):
                copied.synchronize()  # the slot is free once the bytes are on the device
        out = [(x.clone() if hv.borrowed else x) if hv.normalized else self._normalize(x, hv.nhwc, k, v)
               for v, (hv, x) in enumerate(zip(views, xs))]
        return Batch(out[0], y, k, out[1:])

    def _stage(self, v: int) -> Optional[Callable]:
        return self.photometric[v] if v < len(self.photometric) else None

    def _normalize(self, x: torch.Tensor, nhwc: bool, keys: Optional[torch.Tensor], v: int) -> torch.Tensor:
        if nhwc:
            x = x.permute(0, 3, 1, 2)
        # one fp32 buffer, contiguous NCHW, written by the uint8 -> fp32 copy (the transpose rides along) and then
        # normalised in place: bf16 has too few mantissa bits for (x - mean) on 0..255 values
        out = fresh_host_batch(x.shape, torch.float32) if self.copy_stream is None else torch.empty(
            x.shape, dtype=torch.float32, device=self.device)
        out.copy_(x)
        stage = self._stage(v)
        if stage is not None:
            if keys is None:
                raise ValueError(f"view {v}'s photometric ops draw from the samples' keys, and this batch has none")
            out = stage(out, view_key(keys, v))
        out.sub_(self.mean).mul_(self.inv_std)
        return out if self.dtype == torch.float32 else out.to(self.dtype)


def host_output(device: torch.device, dtype: torch.dtype) -> str:
    """What a decoder that can normalise should write (cropdecode.OUT_KINDS): uint8 channels-last when the batch
    goes to an accelerator (4x fewer bytes over the bus than fp32, normalised there), or, when the device is the
    host itself, the compute dtype already normalised [N, C, H, W]: done in the decoding threads, sample by
    sample, instead of three passes over the whole batch in the training process."""
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        return "float32" if dtype == torch.float32 else "bfloat16"
    return "uint8"


def view_output(device: torch.device, dtype: torch.dtype, view, train: bool) -> str:
    """`host_output` for one view: uint8 where the view's photometric ops will run (they work on pixels, before
    the normalisation on the device), else the fast path."""
    return "uint8" if train and view.photometric else host_output(device, dtype)


# A batch that stays on the host is fresh memory every time (38 MB for 64 fp32 images at 224 px): first touched
# 4 KB page by 4 KB page, its page faults cost ~15 ms a batch here; asked for 2 MB pages (transparent huge
# pages, "madvise" mode on most distributions) ~6 ms. Linux only; elsewhere nothing is asked.
_MADV_HUGEPAGE, _HUGE = 14, 1 << 21
MADVISE = None
if sys.platform.startswith("linux"):
    MADVISE = ctypes.CDLL(None, use_errno=True).madvise
    MADVISE.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]  # integers: callable from numba too
    MADVISE.restype = ctypes.c_int


def advise_hugepages(ptr: int, nbytes: int) -> None:
    """Ask for huge pages over the 2 MB-aligned part of [ptr, ptr + nbytes), before it is first written."""
    start = (ptr + _HUGE - 1) & ~(_HUGE - 1)
    length = (ptr + nbytes - start) & ~(_HUGE - 1)
    if MADVISE is not None and length > 0:
        MADVISE(start, length, _MADV_HUGEPAGE)


def fresh_host_batch(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on the host, huge pages requested before anything touches it (see advise_hugepages)."""
    t = torch.empty(shape, dtype=dtype)
    advise_hugepages(t.data_ptr(), t.numel() * t.element_size())
    return t


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t in page-locked memory when it will be copied to a GPU (a non_blocking copy from pageable memory
    stalls the host); unchanged otherwise. Backends pin each epoch's keys once, not per batch."""
    return t.pin_memory() if device.type == "cuda" else t


@dataclass(frozen=True)
class LoaderArgs:
    """What a backend is built with besides its PipelineConfig: runtime facts, not configuration."""

    img_size: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    device: torch.device
    dtype: torch.dtype
    train: bool
    drop_last: bool
    shuffle: bool
    views: tuple = ()
    """The resolved ViewConfigs (config.resolve_views: no field left None, size set); () = one default view."""

    def view_list(self, cfg) -> list:
        """The views to produce: `views`, or the single view a PipelineConfig describes."""
        from .config import resolve_views

        return list(self.views) or resolve_views(cfg, None, self.img_size)

    def photometric_stages(self, views) -> list:
        """DeviceNormalize's per-view photometric stages: only when training, only for views that have any."""
        from .photometric import Photometric

        return [Photometric(v) if self.train and v.photometric else None for v in views]


_K_SEED, _K_EPOCH, _K_INDEX = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation: a function of (seed, epoch, index) only, so the stream
    is the same whatever the worker count, and a resumed run sees exactly the augmentations it would have."""
    h = (seed * _K_SEED + epoch * _K_EPOCH + index * _K_INDEX) & (2**64 - 1)
    h ^= h >> 31
    return h & (2**63 - 1)


def sample_seeds(seed: int, epoch: int, indices) -> torch.Tensor:
    """`sample_seed` for many indices at once: [N] int64 (uint64 arithmetic wraps like the scalar version)."""
    idx = np.asarray(indices, dtype=np.uint64)
    base = np.uint64((seed * _K_SEED + epoch * _K_EPOCH) & (2**64 - 1))
    with np.errstate(over="ignore"):
        h = base + idx * np.uint64(_K_INDEX)
    h ^= h >> np.uint64(31)
    return torch.from_numpy((h & np.uint64(2**63 - 1)).astype(np.int64))


VIEW_STRIDE = 0xD1B54A32D192ED03
"""view_key's step. Not splitmix64's increment 0x9E3779B97F4A7C15: the crop sampler walks its key by that
increment (draw j = mix(key + (j + 1) x 0x9E37...)), so key + 0x9E37... would make view 1's draws view 0's
stream shifted by one (view 1's flip = view 0's filter draw, its crop area = view 0's aspect draw)."""
_M64 = 2**64 - 1


def _int64(u: int) -> int:
    """The int64 with u's low 64 bits (two's complement)."""
    u &= _M64
    return u - 2**64 if u >= 2**63 else u


def view_key_offset(view: int) -> int:
    """What view_key adds for view v, as an int64 (the crop decoder's key_add)."""
    return _int64(view * VIEW_STRIDE)


def view_key(key, view: int):
    """The key view `view` of a sample draws its randomness from: key + view x VIEW_STRIDE, wrapping int64
    arithmetic; view 0 is the key itself. key: a Python int, or an int64 tensor (vectorised, on its device)."""
    if view == 0:
        return key
    if isinstance(key, torch.Tensor):
        return key + view_key_offset(view)  # int64 tensor addition wraps (two's complement)
    return _int64(key + view_key_offset(view))


def shard_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """This rank's sample indices for one epoch.

    Every rank draws the same permutation from (seed, epoch), drops the tail that does not divide by the
    world size, and takes every world_size-th index: shards are disjoint and equally long.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    usable = n - n % world_size
    return order[rank:usable:world_size]


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches one rank reads per epoch from its `shard_indices` shard (num_samples // world_size long)."""
    n = num_samples // world_size
    return n // batch_size if drop_last else -(-n // batch_size)


class EpochShardSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) pairs of this rank's shard, so a dataset's workers know the epoch without
    shared state (and persistent workers stay correct across epochs)."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self) -> Iterator:
        idx = shard_indices(self.n, self.rank, self.world_size, self.seed, self.epoch, self.shuffle)
        epoch = self.epoch
        return iter([(int(i), epoch) for i in idx])


@contextlib.contextmanager
def torch_threads_kept():
    """Put torch's intra-op thread count back after the block: FFCV sets it (to 1 when imported, to its worker
    count when a loader starts), which would leave training's matrix multiplies on one core."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


class Loader:
    """What every backend returns: iterate for Batches; `len()` is batches per epoch on this rank."""

    classes: Sequence[str]
    num_samples: int

    def set_epoch(self, epoch: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def epoch_indices(self) -> List[int]:  # pragma: no cover - interface
        """This rank's sample indices for the current epoch, in the order they are read."""
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:  # pragma: no cover - interface
        raise NotImplementedError
