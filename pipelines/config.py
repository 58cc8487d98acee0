"""Backend-neutral description of a data pipeline.

Imports nothing heavy: `fastvit config` and `fastvit --help` read this module without loading torch.
Runtime facts (rank, world size, device, compute dtype, batch size, crop size) are build arguments of
`pipelines.build_loader`, not fields here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

BACKENDS = ("torchvision", "ffcv", "dali", "turbo")
FFCV_DECODERS = ("crop", "stock")
INTERPOLATIONS = ("bilinear", "bicubic", "random")

EVAL_CROP_RATIO = 0.875
"""Evaluation crop: the centred square of 0.875 x the short side, i.e. Resize(img / 0.875) + CenterCrop(img)
(256 -> 224 at ImageNet scale), on every backend."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PipelineConfig:
    backend: str = "torchvision"
    """torchvision (PIL in DataLoader workers, the reference), ffcv (.beton files), dali (nvJPEG on a GPU), or turbo
    (class-folder JPEGs through the crop-decoder in threads: the fast path without a .beton)."""
    path: str = ""
    """Training data: a class-folder tree (ROOT/<class>/<image>), or for ffcv a .beton (`fastvit convert`)."""
    workers: int = 8
    """Decoding workers per rank: DataLoader processes (torchvision), FFCV or DALI CPU threads."""
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range, as a fraction of the source image (mae-lite: 0.08-1)."""
    crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """RandomResizedCrop aspect-ratio range (w/h)."""
    interpolation: str = "random"
    """Resize filter: bilinear, bicubic, or random (each sample picks one, as mae-lite does)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    randaugment: str = ""
    """Fine-tuning: a timm RandAugment spec (rand-m10-mstd0.5-inc1) applied after crop and flip; empty = off.
    torchvision runs timm's own; dali runs fn rand_augment (n and m from the spec; mstd and inc have no DALI
    equivalent); ffcv has no RandAugment and refuses."""
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean in [0, 1], subtracted on the device."""
    std: Tuple[float, float, float] = IMAGENET_STD
    """Per-channel std in [0, 1], divided on the device."""
    pin_memory: bool = True
    """Pin host batches so the uint8 host-to-device copy is asynchronous (CUDA only)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (torchvision) or the pipeline queue depth (dali)."""
    ffcv_os_cache: bool = True
    """ffcv: read the .beton through the OS page cache (best when it fits in RAM) instead of FFCV's own cache."""
    ffcv_decoder: str = "crop"
    """ffcv: crop (decode only the crop box, seeded per sample, data.interpolation honoured) or stock (FFCV's own
    RandomResizedCrop decoder: whole image, always INTER_AREA, unseeded; the benchmark reference)."""
    dali_hw_decoder_load: float = 0.65
    """dali on a GPU: share of JPEG decoding sent to the hardware decoder (A100/H100), the rest to CUDA nvJPEG."""

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend: unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.ffcv_decoder not in FFCV_DECODERS:
            raise ValueError(
                f"data.ffcv_decoder: unknown decoder {self.ffcv_decoder!r}; expected one of {', '.join(FFCV_DECODERS)}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"data.interpolation: unknown filter {self.interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}"
            )
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.crop_scale: need 0 < low <= high <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"data.crop_ratio: need 0 < low <= high, got {self.crop_ratio}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"data.hflip: a probability in [0, 1] is expected, got {self.hflip}")
        if not 0.0 <= self.dali_hw_decoder_load <= 1.0:
            raise ValueError(f"data.dali_hw_decoder_load: a fraction in [0, 1] is expected, got {self.dali_hw_decoder_load}")
        if self.randaugment:
            parse_randaugment(self.randaugment)
        if self.workers < 0:
            raise ValueError(f"data.workers: must be >= 0, got {self.workers}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.std: every value must be > 0, got {self.std}")


FOLDER_BACKENDS = ("torchvision", "dali", "turbo")


def backend_for(path, preferred: str = "torchvision") -> str:
    """The backend that reads `path`: ffcv for a .beton; for a class-folder tree `preferred` where it reads
    folders (a run's own backend, say), else the torchvision reference."""
    if str(path).endswith(".beton"):
        return "ffcv"
    return preferred if preferred in FOLDER_BACKENDS else "torchvision"


def parse_randaugment(spec: str) -> Tuple[int, int]:
    """timm's "rand-m10-n2-mstd0.5-inc1" -> (n ops, magnitude m on timm's 0..10 scale); n defaults to 2."""
    parts = spec.split("-")
    if parts[0] != "rand" or len(parts) < 2:
        raise ValueError(f"data.randaugment: expected a timm spec like rand-m10-mstd0.5-inc1, got {spec!r}")
    n, m = 2, None
    for p in parts[1:]:
        key = p.rstrip("0123456789.")
        val = p[len(key):]
        if key not in ("m", "n", "mstd", "mmax", "inc", "w", "p") or not val:
            raise ValueError(f"data.randaugment: unknown part {p!r} in {spec!r}")
        if key == "m":
            m = int(float(val))
        elif key == "n":
            n = int(val)
    if m is None or not 0 <= m <= 10:
        raise ValueError(f"data.randaugment: {spec!r} needs a magnitude m0..m10")
    return n, m
