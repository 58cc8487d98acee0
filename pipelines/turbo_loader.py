"""turbo backend: a class-folder tree of JPEGs through the crop-decoder (cropdecode.py), for users without a
.beton: every file is read and only its RandomResizedCrop box decoded (libjpeg-turbo), resampled
bilinear/bicubic per data.interpolation and flipped straight into the sample's slot of the batch, by
data.workers threads (the C code runs without the GIL). Box, filter and flip come from the sample's key, so a
sample gets the same crop here as through the ffcv backend's crop decoder, and a resumed run the same batches.
Multi-view batches: each file is read once and each view decoded from its bytes with its own size, ranges and
key (the decoder's key_add: `base.view_key`).

Batches are prepared data.prefetch_factor ahead. On a CPU device the threads write the batch already
normalised in the compute dtype; on a GPU they write uint8 channels-last into pinned host buffers (a ring the
copy is waited for before reuse) and the device normalises.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import weakref
from typing import Iterator, List

import numpy as np
import torch

from . import cropdecode
from .base import (Batch, DecodeError, DeviceNormalize, HostView, Loader, LoaderArgs, batches_per_epoch,
                   fresh_host_batch, pinned, sample_seeds, shard_indices, view_key_offset, view_output)
from .config import PipelineConfig
from .folder import open_rgb, scan_folder

_DTYPES = {"uint8": torch.uint8, "float32": torch.float32, "bfloat16": torch.bfloat16}


class TurboLoader(Loader):
    def __init__(self, cfg: PipelineConfig, a: LoaderArgs):
        if cfg.randaugment:
            raise ValueError(f"data.randaugment={cfg.randaugment!r}: the turbo backend has no RandAugment; use "
                             "data.backend=torchvision or dali for fine-tuning with it")
        self.samples, self.classes = scan_folder(cfg.path)
        self.num_samples = len(self.samples)
        self.paths = [p for p, _ in self.samples]
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        views = a.view_list(cfg)
        self.views = [_View(v.size, cropdecode.CropAug(v.crop_scale, v.crop_ratio, v.hflip, cfg.interpolation, cfg.crop_pct),
                            view_output(a.device, a.dtype, v, a.train), view_key_offset(i), cfg)
                      for i, v in enumerate(views)]
        self.a, self.workers, self.ahead = a, cfg.workers, max(1, cfg.prefetch_factor)
        self.to_device = DeviceNormalize(cfg.mean, cfg.std, a.device, a.dtype, a.photometric_stages(views))
        self.pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="turbo") if self.workers > 0 else None
        self.epoch = 0
        self._slots: List[List[torch.Tensor]] = [[] for _ in views]  # per view: pinned uint8 batches for a GPU
        self._running = None  # weakref to the epoch generator now reading

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> List[int]:
        return shard_indices(self.num_samples, self.a.rank, self.a.world_size, self.a.seed, self.epoch,
                             self.a.shuffle).tolist()

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.a.world_size, self.a.batch_size, self.a.drop_last)

    def _buffer(self, b: int, n: int, v: int) -> torch.Tensor:
        S, out = self.views[v].size, self.views[v].out
        if out != "uint8":  # a fresh tensor the Batch owns: nothing to copy afterwards
            return fresh_host_batch((n, 3, S, S), _DTYPES[out])
        if self.to_device.copy_stream is None:
            return torch.empty((n, S, S, 3), dtype=torch.uint8)
        slots, ring = self.ahead + 1, self._slots[v]
        while len(ring) < slots:  # pinning is slow: a ring, each slot freed once its copy has landed
            ring.append(pinned(torch.empty((self.a.batch_size, S, S, 3), dtype=torch.uint8), self.a.device))
        return ring[b % slots][:n]

    def _decode(self, idx: List[int], outs: List[torch.Tensor], first: int, last: int) -> None:
        """Samples first..last-1 of a batch into their slots of outs (one per view). Runs in a pool thread;
        raises DecodeError naming the file (re-raised in the training process when the batch is collected)."""
        for j in range(first, last):
            path = self.paths[idx[j]]
            try:
                data = np.fromfile(path, dtype=np.uint8)
            except OSError as err:
                raise DecodeError(f"cannot read image {path}: {err.strerror or err}") from err

            def sample(data: np.ndarray, source: int, h: int, w: int, view: _View, out: torch.Tensor) -> int:
                S, step = view.size, out[0].numel() * out.element_size()
                return cropdecode.SAMPLE_VIEW(data.ctypes.data, data.size, source, h, w, self.a.seed,
                                              self._epoch.ctypes.data, idx[j], int(self.a.train),
                                              view.args.ctypes.data, view.aug.filter_mode,
                                              cropdecode.OUT_KINDS[view.out], out.data_ptr() + j * step, S, S, 0,
                                              view.key_add)

            # a JPEG's size comes from its header, in C; anything else (a PNG in an ImageNet-style tree), and a
            # CMYK / YCCK JPEG, is decoded by PIL, then cropped from its pixels by the same code
            source, h, w = 0, 0, 0
            if data[:2].tobytes() != b"\xff\xd8":
                data, source = None, 1
            for view, out in zip(self.views, outs):
                rc = cropdecode.ERR_COLOR if data is None else sample(data, source, h, w, view, out)
                if rc == cropdecode.ERR_COLOR:  # once per file: later views crop the same decoded pixels
                    data = np.ascontiguousarray(np.asarray(open_rgb(path)))
                    source, h, w = 1, data.shape[0], data.shape[1]
                    rc = sample(data, source, h, w, view, out)
                if rc != 0:
                    why = cropdecode.why_not_decodable(data) or f"error {rc}"
                    raise DecodeError(f"cannot decode image {path}: {why}")

    def _submit(self, b: int, order: List[int]):
        B = self.a.batch_size
        idx = order[b * B : (b + 1) * B]
        out = [self._buffer(b, len(idx), v) for v in range(len(self.views))]
        if self.pool is None:
            self._decode(idx, out, 0, len(idx))
            jobs = []
        else:  # one contiguous share per thread: few Python calls per batch
            cuts = np.linspace(0, len(idx), self.workers + 1).astype(int)
            jobs = [self.pool.submit(self._decode, idx, out, int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])
                    if hi > lo]
        return b, idx, out, jobs

    def __iter__(self) -> Iterator[Batch]:
        running = self._running and self._running()
        if running is not None:
            running.close()  # one epoch at a time: they share the ring of pinned slots and the epoch number
        epoch = self._epoch_batches()
        self._running = weakref.ref(epoch)
        return epoch

    def _epoch_batches(self) -> Iterator[Batch]:
        order = self.epoch_indices()
        keys = pinned(sample_seeds(self.a.seed, self.epoch, order), self.a.device)
        self._epoch = np.array([self.epoch], dtype=np.int64)
        n_batches = len(self)
        queue = collections.deque(self._submit(b, order) for b in range(min(self.ahead, n_batches)))
        next_b = len(queue)
        B = self.a.batch_size
        try:
            while queue:
                b, idx, out, jobs = queue[0]
                for job in jobs:
                    job.result()  # re-raises a thread's DecodeError here, in the training process
                queue.popleft()
                if next_b < n_batches:
                    queue.append(self._submit(next_b, order))
                    next_b += 1
                k, labels = keys[b * B : b * B + len(idx)], self.labels[idx]
                # uint8 is borrowed on a GPU: the ring slot is refilled ahead once this batch's copy has landed
                hv = [HostView(x, nhwc=True, borrowed=self.to_device.copy_stream is not None) if v.out == "uint8"
                      else HostView(x, normalized=True) for v, x in zip(self.views, out)]
                yield self.to_device(hv[0].images, labels, k, nhwc=hv[0].nhwc, borrowed=hv[0].borrowed,
                                     normalized=hv[0].normalized, more_views=hv[1:])
        finally:  # abandoned or failed: wait for the threads still writing into this epoch's buffers
            for *_, jobs in queue:
                for job in jobs:
                    job.cancel() or job.exception()


class _View:
    """One view as the decoder threads need it: output side, crop ranges (the decoder's `args`, normalisation
    included), what to write (cropdecode.OUT_KINDS) and the key offset."""

    def __init__(self, size: int, aug, out: str, key_add: int, cfg: PipelineConfig):
        self.size, self.aug, self.out, self.key_add = size, aug, out, key_add
        self.args = aug.as_array(cfg.mean, cfg.std)
