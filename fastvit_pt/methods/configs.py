"""Each training method's config section, `method: {name: <method>, ...}`, and the registry that finds it.

Torch-free, like the rest of the config: `fastvit config` and a recipe's errors answer without loading torch.
A method registers its section here (`@register`, naming the module that builds it) and lives in that module;
nothing else in the code base names it. Switching `method.name` in a recipe or override keeps the settings
both sections share (mask_ratio from mae to dmae) and refuses a setting the new method does not have.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Dict, List, Optional, Tuple, Type

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.config import ViewConfig


class MethodConfigError(ValueError):
    """A method section's value is wrong; the message names the key (config.ConfigError re-raises it)."""


@dataclass
class MethodConfig:
    """The fields every method section has. Subclasses add theirs, each with one docstring line."""

    name: str = "mae"
    """The training method (`fastvit models` lists them)."""

    module: ClassVar[str] = ""  # the module whose `build(section, model, plan)` makes the Method
    classifies: ClassVar[bool] = False  # trains a classifier that eval.path can score (fastvit finetune)
    baseline: ClassVar[Optional[str]] = None  # the method `fastvit bench e2e` times beside this one (D-MAE: MAE)

    def validate(self) -> None:
        """Raise MethodConfigError naming the key at fault."""

    def paths(self) -> Dict[str, Optional[str]]:
        """Files this section reads, by dotted key: checked to exist before torch is imported."""
        return {}

    def views(self) -> "Optional[List[ViewConfig]]":
        """The crops the method needs per image; None: the data section's one training crop."""
        return None


_REGISTRY: Dict[str, Type[MethodConfig]] = {}


def register(name: str, module: str) -> Callable[[Type[MethodConfig]], Type[MethodConfig]]:
    def deco(cls: Type[MethodConfig]) -> Type[MethodConfig]:
        cls.module = module
        _REGISTRY[name] = cls
        return cls

    return deco


def method_names() -> List[str]:
    return sorted(_REGISTRY)


def section_class(name: str) -> Optional[Type[MethodConfig]]:
    return _REGISTRY.get(name)


def _check_fraction(key: str, value: float, low_open: bool = True) -> None:
    if not ((0.0 < value) if low_open else (0.0 <= value)) or value >= 1.0:
        raise MethodConfigError(f"method.{key} must be in {'(' if low_open else '['}0, 1), got {value}")


@register("mae", "fastvit_pt.methods.mae")
@dataclass
class MAEConfig(MethodConfig):
    """MAE: reconstruct the masked patches of one view."""

    name: str = "mae"
    """The training method (`fastvit models` lists them)."""
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (MAE's better target)."""

    def validate(self) -> None:
        _check_fraction("mask_ratio", self.mask_ratio)


@register("dmae", "fastvit_pt.methods.dmae")
@dataclass
class DistillConfig(MAEConfig):
    """D-MAE (mae-lite): MAE pre-training that also distils a frozen MAE teacher's attention."""

    baseline: ClassVar[Optional[str]] = "mae"  # the teacher's cost is measured against plain MAE
    name: str = "dmae"
    """The training method (`fastvit models` lists them)."""
    teacher: Optional[str] = None
    """The teacher's checkpoint: ours, mae-lite's or facebookresearch/mae's (its decoder is dropped). Required;
    `random` gives a randomly initialised teacher (benchmarks only: it teaches nothing)."""
    teacher_model: str = "vit_base_patch16"
    """The teacher encoder (`fastvit models`); an mae_* name means its encoder. Default MAE-Base: 768-d, 12 heads."""
    attn_weight: float = 1.0
    """Weight of the MSE between the student's last-layer attention logits (through a 1x1 head-mixing adapter)
    and the teacher's."""
    hidden_layers: List[int] = field(default_factory=list)
    """Blocks (0-based, same index in student and teacher) whose outputs are also distilled through a Linear
    adapter; empty = off."""
    hidden_weight: float = 1.0
    """Weight of the hidden-state MSE (when hidden_layers is set)."""

    def validate(self) -> None:
        super().validate()
        if self.attn_weight < 0 or self.hidden_weight < 0:
            raise MethodConfigError("method.attn_weight and method.hidden_weight must be >= 0")

    def paths(self) -> Dict[str, Optional[str]]:
        return {"method.teacher": None if self.teacher == "random" else self.teacher}


@register("d2mae", "fastvit_pt.methods.d2mae")
@dataclass
class D2MAEConfig(DistillConfig):
    """D2-MAE (mae-lite): D-MAE with the decoder reading an intermediate block."""

    name: str = "d2mae"
    """The training method (`fastvit models` lists them)."""
    decoder_block: int = 8
    """The decoder reconstructs from this block's output (1-based, as in mae-lite's D2-MAE)."""

    def validate(self) -> None:
        super().validate()
        if self.decoder_block < 1:
            raise MethodConfigError(f"method.decoder_block must be >= 1 (1-based), got {self.decoder_block}")


@register("finetune", "fastvit_pt.methods.finetune")
@dataclass
class FinetuneConfig(MethodConfig):
    """Supervised training of a classifier from a pre-trained backbone."""

    classifies: ClassVar[bool] = True

    name: str = "finetune"
    """The training method (`fastvit models` lists them)."""
    init: Optional[str] = None
    """The backbone to start from: any checkpoint `fastvit knn` reads (ours, mae-lite's, facebookresearch/mae's,
    timm's), or `scratch` for random initialisation. Required. Its head is never kept: a fresh one is trained."""
    global_pool: str = "avg"
    """Classifier pooling: avg (mean of the patch tokens, then fc_norm: mae-lite's improved recipe) or token."""
    layer_decay: float = 0.85
    """Layer-wise lr decay: block i trains at decay^(depth - i) of the peak, the embeddings at decay^(depth + 1)."""
    mixup: float = 0.2
    """Mixup alpha (0 = off); timm's Mixup, applied to the batch on the device."""
    cutmix: float = 0.0
    """CutMix alpha (0 = off); with mixup > 0 too, each batch picks one of them at random."""
    smoothing: float = 0.0
    """Label smoothing."""
    reprob: float = 0.0
    """Random-erasing probability (timm's RandomErasing, per-pixel noise, on the device)."""

    def validate(self) -> None:
        if self.global_pool not in ("avg", "token"):
            raise MethodConfigError(f"method.global_pool: expected avg or token, got {self.global_pool!r}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise MethodConfigError(f"method.layer_decay must be in (0, 1], got {self.layer_decay}")
        for key in ("mixup", "cutmix", "smoothing", "reprob"):
            if getattr(self, key) < 0:
                raise MethodConfigError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if self.smoothing >= 1 or self.reprob > 1:
            raise MethodConfigError("method.smoothing must be < 1 and method.reprob <= 1")

    def paths(self) -> Dict[str, Optional[str]]:
        return {"method.init": None if self.init == "scratch" else self.init}


@register("mocov3", "fastvit_pt.methods.mocov3")
@dataclass
class MoCoV3Config(MethodConfig):
    """MoCo-v3 (facebookresearch/moco-v3): two views, base and momentum encoders, symmetric InfoNCE."""

    name: str = "mocov3"
    """The training method (`fastvit models` lists them)."""
    temperature: float = 0.2
    """InfoNCE temperature (moco-v3's --moco-t for ViTs)."""
    momentum: float = 0.99
    """Momentum of the key encoder at step 0; it rises to momentum_end on a half-cosine (moco-v3's --moco-m)."""
    momentum_end: float = 1.0
    """Momentum at the last step (moco-v3: 1; --moco-m-cos)."""
    dim: int = 256
    """Output dimension of the projector and the predictor."""
    mlp_dim: int = 4096
    """Hidden dimension of the projector and the predictor."""
    proj_layers: int = 3
    """Linear layers of the projector (BN + ReLU between, BN without affine after the last)."""
    pred_layers: int = 2
    """Linear layers of the predictor (BN + ReLU between, no BN after the last)."""
    stop_grad_patch_embed: bool = True
    """Freeze the random patch projection (moco-v3's stop-grad-conv1 for ViTs: it stabilises training)."""
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    """Random-resized-crop area range of both views (moco-v3's --crop-min)."""
    color_jitter: float = 0.8
    """Probability of colour jitter (0.4, 0.4, 0.2, 0.1) in each view (BYOL's augmentation, as moco-v3)."""
    grayscale: float = 0.2
    """Probability of converting each view to grayscale."""
    blur: Tuple[float, float] = (1.0, 0.1)
    """Probability of a Gaussian blur (sigma 0.1..2) in view 1 and view 2 (BYOL's asymmetric pair)."""
    solarize: Tuple[float, float] = (0.0, 0.2)
    """Probability of solarisation in view 1 and view 2."""

    def validate(self) -> None:
        if self.temperature <= 0:
            raise MethodConfigError(f"method.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.momentum <= self.momentum_end <= 1.0:
            raise MethodConfigError(f"method.momentum and momentum_end: need 0 <= momentum <= momentum_end <= 1, "
                                    f"got {self.momentum} and {self.momentum_end}")
        if min(self.dim, self.mlp_dim, self.proj_layers, self.pred_layers) < 1:
            raise MethodConfigError("method.dim, mlp_dim, proj_layers and pred_layers must be >= 1")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise MethodConfigError(f"method.crop_scale: need 0 < low <= high <= 1, got {self.crop_scale}")
        for key in ("color_jitter", "grayscale"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise MethodConfigError(f"method.{key}: a probability in [0, 1] is expected, got {getattr(self, key)}")
        for key in ("blur", "solarize"):
            if not all(0.0 <= p <= 1.0 for p in getattr(self, key)):
                raise MethodConfigError(f"method.{key}: two probabilities in [0, 1] are expected, got {getattr(self, key)}")

    def views(self) -> List["ViewConfig"]:
        from pipelines.config import ViewConfig

        return [ViewConfig(crop_scale=self.crop_scale, color_jitter=self.color_jitter, grayscale=self.grayscale,
                           blur=self.blur[i], solarize=self.solarize[i]) for i in range(2)]


# old layouts (before methods owned their sections): `finetune:` and `distill:` were top-level sections
LEGACY_SECTIONS = ("finetune", "distill")


def switch_section(old: MethodConfig, name: str, drop: bool = False) -> MethodConfig:
    """`old` as method `name`'s section: shared fields keep their values; a field the new section lacks must
    be at its default or it is an error, never silently dropped (drop=True: dropped, for a deliberate comparison
    such as D-MAE's recipe as plain MAE)."""
    cls = _REGISTRY[name]
    if type(old) is cls:
        return old
    new = cls()
    new_fields = {f.name for f in dataclasses.fields(cls)}
    defaults = type(old)()
    for f in dataclasses.fields(old):
        if f.name == "name":
            continue
        value = getattr(old, f.name)
        if f.name in new_fields:
            setattr(new, f.name, value)
        elif value != getattr(defaults, f.name) and not drop:
            raise MethodConfigError(f"method.{f.name}={value!r} is a setting of method {old.name!r}, which method "
                                    f"{name!r} does not have; start from a recipe for method {name!r}, or one that "
                                    f"leaves method.{f.name} at its default")
    new.name = name
    return new
