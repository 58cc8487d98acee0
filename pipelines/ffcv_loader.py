"""FFCV backend: reads a .beton written by pipelines/beton.py (or any FFCV file with an RGBImageField
"image" and an IntField "label"). The only file that imports ffcv's loader.

Order: FFCV's RANDOM order shards through torch's DistributedSampler, which pads the last shard with
repeated samples; instead this loader puts `shard_indices` in its place: the same disjoint, equal,
per-epoch-reshuffled shards as every other backend (and QUASI_RANDOM, which has no distributed support,
is not used).

Decoding (data.ffcv_decoder):
  crop   `CropDecode`, an FFCV operation calling the crop-decoder (cropdecode.py) from numba in FFCV's
         threads: only the RandomResizedCrop box is decoded, resampled bilinear/bicubic per
         data.interpolation and flipped straight into the sample's slot; box, filter and flip come from the
         sample's key, so runs resume bit-exactly and the turbo backend gives a sample the same crop.
         A corrupt JPEG raises DecodeError naming the sample.
  stock  FFCV's RandomResizedCropRGBImageDecoder: decodes the whole image, always cv2.INTER_AREA (so
         data.interpolation has no effect), draws from numba's unseeded per-thread generators (augmentations
         are not reproducible run to run; the data order is), and decodes a corrupt JPEG to whatever
         libjpeg-turbo left in the buffer without a word. Kept as the reference for benchmarks.
Either way the pixels stay channels-last on the host and are transposed on the device.

Multi-view batches: one PipelineSpec per view, each with its own decoder over the same "image" field (crop: a
CropDecode with the view's size, ranges and key offset, `base.view_key`; stock: a RandomResizedCrop decoder and a
flip per view). FFCV yields the field outputs first (image, label), then the extra views in order.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator, List

from dataclasses import replace

import numba
import numpy as np
import torch

from .base import (Batch, DecodeError, DeviceNormalize, HostView, Loader, LoaderArgs, advise_hugepages, pinned,
                   sample_seeds, shard_indices, torch_threads_kept, view_key_offset, view_output)
from .beton import manifest_path
from .config import PipelineConfig

with torch_threads_kept():  # importing ffcv sets torch's thread count to 1
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader as FFCVLoader
    from ffcv.loader import OrderOption
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.operation import Operation
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor


def _numba_threads_only(cls, n: int) -> None:
    """FFCV's Compiler.set_num_threads minus its torch.set_num_threads(n): FFCV calls it when a loader is built
    and from its batch thread at every epoch, and torch's count is process-wide (MKL), so data.workers=1 put
    training's matrix multiplies on one core (demo: 100-130 img/s instead of 160+ measured here)."""
    cls.num_threads = n if n >= 1 else (os.cpu_count() or 1)
    numba.set_num_threads(cls.num_threads)


Compiler.set_num_threads = classmethod(_numba_threads_only)


class CropDecode(Operation):
    """FFCV decoder operation for an RGBImageField: the crop-decoder in place of FFCV's RandomResizedCrop
    (train) or CenterCrop (eval) decoders. Writes [H, W, 3] uint8 per sample; JPEG and raw samples alike.

    FFCV gives an operation the batch's sample indices but not the epoch, and its batch thread cannot raise
    (an exception there leaves the consumer waiting forever). So the epoch is read through a one-element
    array the loader sets before each epoch, and a failure stores the sample index into another one, which
    the loader checks after every batch."""

    def __init__(self, size, aug, train: bool, seed: int, out: str = "uint8", mean=(0.0,) * 3, std=(1.0 / 255.0,) * 3,
                 key_add: int = 0):
        from . import cropdecode  # the C library: only where the crop decoder is asked for

        super().__init__()
        self.size, self.aug, self.train, self.seed = (int(size[0]), int(size[1])), aug, train, seed
        self.key_add = key_add  # view v of a multi-view batch: base.view_key_offset(v)
        self.out_kind = cropdecode.OUT_KINDS[out]
        self.aug_array = aug.as_array(mean, std)
        self.epoch = np.zeros(1, dtype=np.int64)
        self.error_index = np.full(1, -1, dtype=np.int64)

    def declare_state_and_memory(self, previous_state):
        if self.out_kind == 0:  # uint8 [H, W, 3] into FFCV's ring of batch slots (copied to the device from there)
            shape, dtype = (*self.size, 3), np.dtype("<u1")
            return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)
        # normalised [3, H, W] for a host-side batch: a fresh array per batch, allocated in the compiled code,
        # that the Batch then owns (a ring slot would have to be copied out: 38 MB per fp32 batch of 64).
        # bf16 travels as int16 bits (numpy has no bfloat16) and is viewed as such
        shape, dtype = (3, *self.size), np.dtype("<f4" if self.out_kind == 1 else "<i2")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), None

    def generate_code(self):
        from . import cropdecode

        mem_read, my_range, sample = self.memory_read, Compiler.get_iterator(), cropdecode.SAMPLE_VIEW
        hugepages = Compiler.compile(advise_hugepages)
        # plain integers, frozen into the compiled code; the arrays they point to live as long as this op
        seed, train, filter_mode, out_kind, key_add = (self.seed, int(self.train), self.aug.filter_mode, self.out_kind,
                                                       self.key_add)
        epoch_at, error_at, aug_at = self.epoch.ctypes.data, self.error_index.ctypes.data, self.aug_array.ctypes.data
        out_h, out_w = self.size
        fresh = np.float32 if out_kind == 1 else np.int16

        def decode(batch_indices, destination, metadata, storage_state):
            n = len(batch_indices)
            if out_kind == 0:
                out = destination[:n]
            else:
                out = np.empty((n, 3, out_h, out_w), dtype=fresh)
                hugepages(out.ctypes.data, out.size * out.itemsize)
            for dst_ix in my_range(n):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                sample(data.ctypes.data, data.size, field["mode"], field["height"], field["width"], seed, epoch_at,
                       source_ix, train, aug_at, filter_mode, out_kind, out[dst_ix].ctypes.data, out_h, out_w,
                       error_at, key_add)
            return out

        decode.is_parallel = True
        return decode


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
        views = a.view_list(cfg)
        self.crop_ops: List[CropDecode] = []
        # per view: what its decoder writes (uint8 [N, H, W, 3], or [N, 3, H, W] normalised in the compute dtype)
        self.outs = ["uint8"] * len(views)
        if cfg.ffcv_decoder == "crop":
            try:
                from . import cropdecode
            except ImportError as err:
                raise ImportError(f"data.ffcv_decoder=crop: {err}; or use data.ffcv_decoder=stock (FFCV's own "
                                  "decoder)") from err
            self.outs = [view_output(a.device, a.dtype, v, a.train) for v in views]
            self.crop_ops = [
                CropDecode((v.size, v.size), cropdecode.CropAug(v.crop_scale, v.crop_ratio, v.hflip, cfg.interpolation, cfg.crop_pct),
                           a.train, a.seed, out, cfg.mean, cfg.std, key_add=view_key_offset(i))
                for i, (v, out) in enumerate(zip(views, self.outs))]
            # a PipelineSpec: FFCV takes a list's first operation as the decoder only if it subclasses the field's
            # default decoder class (SimpleRGBImageDecoder), which CropDecode has no reason to
            specs = [PipelineSpec("image", decoder=op, transforms=[ToTensor()]) for op in self.crop_ops]
        elif a.train:
            if cfg.interpolation != "bilinear":
                warnings.warn(f"data.interpolation={cfg.interpolation} has no effect with data.ffcv_decoder=stock: "
                              "FFCV's RandomResizedCrop decoder always resizes with cv2.INTER_AREA", stacklevel=3)
            specs = [[RandomResizedCropRGBImageDecoder((v.size, v.size), scale=v.crop_scale, ratio=v.crop_ratio),
                      RandomHorizontalFlip(v.hflip), ToTensor()] for v in views]
        else:
            specs = [[CenterCropRGBImageDecoder((v.size, v.size), ratio=cfg.crop_pct), ToTensor()] for v in views]
        # [N, H, W, 3] uint8 from the stock decoders: DeviceNormalize transposes on the device. Views 1.. read the
        # same "image" field under their own output names (a plain list would name a field that does not exist)
        pipelines = {"image": specs[0], "label": [IntDecoder(), ToTensor(), Squeeze(1)]}
        for i, spec in enumerate(specs[1:], start=1):
            pipelines[f"image_view{i}"] = spec if isinstance(spec, PipelineSpec) else PipelineSpec(
                "image", decoder=spec[0], transforms=spec[1:])
        self.loader = FFCVLoader(
            str(path),
            batch_size=a.batch_size,
            num_workers=_threads(cfg.workers),
            os_cache=cfg.ffcv_os_cache,
            order=OrderOption.SEQUENTIAL,
            seed=a.seed,
            drop_last=a.drop_last,
            batches_ahead=max(1, cfg.prefetch_factor),
            pipelines=pipelines,
        )
        # FFCV 1.0.2 cannot take a custom order class through its constructor (it checks isinstance, then
        # calls the instance); it reads the order from this attribute at every epoch, so set it here
        self.loader.traversal_order = _ShardOrder(self.loader, a.rank, a.world_size, a.seed, a.shuffle)
        self.loader.first_traversal_order = self.loader.traversal_order.sample_order(0)
        self.num_samples = int(self.loader.reader.num_samples)
        self.classes = _classes(path)
        self.to_device = DeviceNormalize(cfg.mean, cfg.std, a.device, a.dtype, a.photometric_stages(views))
        self.seed, self.epoch, self.path = a.seed, 0, path

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
        order = self.epoch_indices()
        keys = pinned(sample_seeds(self.seed, self.epoch, order), self.to_device.device)
        for op in self.crop_ops:
            op.epoch[0] = self.epoch
            op.error_index[0] = -1
        B = self.loader.batch_size
        epoch = iter(self.loader)
        try:
            yield from self._batches(epoch, keys, B)
        finally:  # an abandoned epoch (a benchmark, `fastvit tune`, an error): stop FFCV's thread decoding ahead
            if epoch.is_alive():  # (a finished epoch closed itself; FFCV's close is not idempotent)
                epoch.close()

    def _batches(self, epoch, keys, B) -> Iterator[Batch]:
        for b, (images, labels, *more) in enumerate(epoch):
            for op in self.crop_ops:
                if op.error_index[0] >= 0:
                    raise self._decode_error(int(op.error_index[0]))
            k = keys[b * B : b * B + images.shape[0]]
            views = [self._host_view(x, out) for x, out in zip((images, *more), self.outs)]
            # uint8 from FFCV's ring of batch slots is borrowed; a normalised view is a fresh array (CropDecode)
            first = {"nhwc": True, "borrowed": True} if self.outs[0] == "uint8" else {"normalized": True}
            if views[1:]:
                first["more_views"] = views[1:]
            yield self.to_device(views[0].images, labels, k, **first)

    @staticmethod
    def _host_view(images: torch.Tensor, out: str) -> HostView:
        if out == "uint8":
            return HostView(images, nhwc=True, borrowed=True)
        return HostView(images.view(torch.bfloat16) if out == "bfloat16" else images, normalized=True)

    def _decode_error(self, index: int) -> DecodeError:
        """Why sample `index` did not decode, from its bytes in the file (libjpeg's own message)."""
        reader = self.loader.reader
        names = list(reader.field_names)
        field = reader.metadata[f"f{names.index('image')}"][index]
        reason = "decoding failed"
        if field["mode"] == 0:  # jpg: read its bytes back through the allocation table (file offset, size)
            table = reader.alloc_table
            row = table[(table["sample_id"] == index) & (table["ptr"] == field["data_ptr"])]
            if len(row):
                data = np.fromfile(reader._fname, dtype=np.uint8, count=int(row["size"][0]), offset=int(row["ptr"][0]))
                from . import cropdecode

                reason = cropdecode.why_not_decodable(data) or reason
        label = ""
        if "label" in names and self.classes:
            value = int(reader.metadata[f"f{names.index('label')}"][index])
            label = f" (class {self.classes[value]})"
        return DecodeError(f"cannot decode image: sample {index}{label} of {self.path}: {reason}")


def _threads(workers: int) -> int:
    """FFCV's decoding threads are numba's, which cannot outnumber NUMBA_NUM_THREADS (the core count unless set):
    more would fail with numba's "number of threads must be between 1 and N"."""
    most = numba.config.NUMBA_NUM_THREADS
    if workers > most:
        warnings.warn(f"data.workers={workers}: the ffcv backend decodes in numba threads, at most {most} here "
                      f"(NUMBA_NUM_THREADS); using {most}", stacklevel=4)
    return max(1, min(workers, most))


def _classes(path: Path) -> List[str]:
    """Class names from the converter's manifest; plain FFCV files have none, so indices stand in."""
    manifest = manifest_path(path)
    if manifest.is_file():
        return list(json.loads(manifest.read_text())["classes"])
    return []
