"""Backend-neutral description of a data pipeline.

Imports nothing heavy: `fastvit config` and `fastvit --help` read this module without loading torch.
Runtime facts (rank, world size, device, compute dtype, batch size, crop size) are build arguments of
`pipelines.build_loader`, not fields here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

BACKENDS = ("torchvision", "ffcv", "dali", "turbo")
FFCV_DECODERS = ("crop", "stock")
INTERPOLATIONS = ("bilinear", "bicubic", "random")

EVAL_CROP_RATIO = 0.875
"""The default evaluation crop (data.crop_pct): the centred square of 0.875 x the short side, i.e.
Resize(img / 0.875) + CenterCrop(img) (256 -> 224 at ImageNet scale), on every backend."""

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
    crop_pct: float = EVAL_CROP_RATIO
    """Evaluation crop, as timm's crop_pct: resize the short side to img_size / crop_pct, then centre-crop img_size
    (0.875: 256 -> 224 at ImageNet scale). 1.0 scores the whole image: small images (Fashion-MNIST's 28 px) whose
    objects fill the frame lose their borders to 0.875."""
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
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"data.crop_pct: the evaluation crop's share of the short side, in (0, 1], got "
                             f"{self.crop_pct}")
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


@dataclass
class ViewConfig:
    """One crop of each sample in a multi-view batch (MoCo-v3: two 224-px views; DINO: 2 global + N local).

    Geometry (RandomResizedCrop, flip, filter) runs in the backend's decoder; the photometric ops (colour jitter,
    grayscale, blur, solarize, in MoCo-v3's order) run once per batch on the device, `pipelines.photometric`,
    and only when training. Every random draw comes from the view's key (`base.view_key`)."""

    size: int = 0
    """Output side in pixels; 0 = the loader's img_size."""
    crop_scale: Optional[Tuple[float, float]] = None
    """RandomResizedCrop area range (fraction of the source); None = the PipelineConfig's crop_scale."""
    crop_ratio: Optional[Tuple[float, float]] = None
    """RandomResizedCrop aspect-ratio range (w/h); None = the PipelineConfig's crop_ratio."""
    hflip: Optional[float] = None
    """Probability of a horizontal flip; None = the PipelineConfig's hflip."""
    color_jitter: float = 0.0
    """Probability of applying colour jitter (brightness, contrast, saturation, hue in a random order per sample)."""
    brightness: float = 0.4
    """Jitter brightness: factor ~ U[max(0, 1 - b), 1 + b], as torchvision's ColorJitter."""
    contrast: float = 0.4
    """Jitter contrast: factor ~ U[max(0, 1 - c), 1 + c]."""
    saturation: float = 0.2
    """Jitter saturation: factor ~ U[max(0, 1 - s), 1 + s]."""
    hue: float = 0.1
    """Jitter hue: shift ~ U[-h, h] of a full turn; at most 0.5."""
    grayscale: float = 0.0
    """Probability of grayscale (torchvision's 0.2989 / 0.587 / 0.114 luma, replicated to 3 channels)."""
    blur: float = 0.0
    """Probability of a Gaussian blur (kernel 2 ceil(3 sigma_max) + 1, reflect padding)."""
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    """Blur sigma range in output pixels, sigma ~ U[low, high] per sample."""
    solarize: float = 0.0
    """Probability of solarizing (pixels >= 128 become 255 - x, PIL's ImageOps.solarize)."""

    @property
    def photometric(self) -> bool:
        """Whether any photometric op can fire: such a view goes to the device as uint8 (never pre-normalised)."""
        return any(p > 0 for p in (self.color_jitter, self.grayscale, self.blur, self.solarize))

    def validate(self, where: str = "view") -> None:
        """ValueError naming `where`.field (data.views[1].hue, say) and what was expected."""
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"{where}.size: a side in pixels >= 0 is expected (0 = the loader's img_size), got "
                             f"{self.size!r}")
        if self.crop_scale is not None:
            lo, hi = _pair(self.crop_scale, f"{where}.crop_scale")
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{where}.crop_scale: need 0 < low <= high <= 1, got {self.crop_scale}")
        if self.crop_ratio is not None:
            lo, hi = _pair(self.crop_ratio, f"{where}.crop_ratio")
            if not 0.0 < lo <= hi:
                raise ValueError(f"{where}.crop_ratio: need 0 < low <= high, got {self.crop_ratio}")
        for name in ("hflip", "color_jitter", "grayscale", "blur", "solarize"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p <= 1.0:
                raise ValueError(f"{where}.{name}: a probability in [0, 1] is expected, got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name}: a jitter strength >= 0 is expected, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"{where}.hue: a shift in [0, 0.5] of a turn is expected, got {self.hue}")
        lo, hi = _pair(self.blur_sigma, f"{where}.blur_sigma")
        if not 0.0 < lo <= hi:
            raise ValueError(f"{where}.blur_sigma: need 0 < low <= high, got {self.blur_sigma}")


def resolve_views(cfg: PipelineConfig, views: Optional[Sequence[ViewConfig]], img_size: int) -> List[ViewConfig]:
    """Each view validated (errors name views[i].field) with nothing left to a default: size, crop ranges and
    flip taken from img_size and cfg where unset. None = the one view cfg describes (no photometric ops)."""
    if views is None:
        views = [ViewConfig()]
    elif isinstance(views, ViewConfig) or not len(views):
        raise ValueError(f"views: a non-empty sequence of ViewConfig is expected (None = one view), got {views!r}")
    out = []
    for i, v in enumerate(views):
        if not isinstance(v, ViewConfig):
            raise ValueError(f"views[{i}]: a ViewConfig is expected, got {type(v).__name__}")
        v.validate(f"views[{i}]")
        size, radius = v.size or img_size, math.ceil(3 * v.blur_sigma[1])
        if v.blur > 0 and radius >= size:
            raise ValueError(f"views[{i}].blur_sigma: the blur kernel's radius ceil(3 x {v.blur_sigma[1]}) = {radius} "
                             f"must be below the view's size, {size} px (reflect padding)")
        out.append(replace(
            v,
            size=size,
            crop_scale=tuple(cfg.crop_scale if v.crop_scale is None else v.crop_scale),
            crop_ratio=tuple(cfg.crop_ratio if v.crop_ratio is None else v.crop_ratio),
            hflip=cfg.hflip if v.hflip is None else v.hflip,
            blur_sigma=tuple(v.blur_sigma),
        ))
    return out


def _pair(value, where: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a (low, high) pair of numbers is expected, got {value!r}") from None
    return lo, hi


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
