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


def _check_ema(section) -> None:
    """momentum <= momentum_end, both in [0, 1] (an EMA's momentum, rising on a cosine)."""
    if not 0.0 <= section.momentum <= section.momentum_end <= 1.0:
        raise MethodConfigError(f"method.momentum and momentum_end: need 0 <= momentum <= momentum_end <= 1, "
                                f"got {section.momentum} and {section.momentum_end}")


def _check_augmentation(section, per_view: str, scales=("crop_scale",)) -> None:
    """The multi-view sections' crop ranges, and their photometric probabilities: color_jitter and grayscale one
    for every view, blur and solarize one per kind of view (`per_view` says which, for the message)."""
    for key in scales:
        lo, hi = getattr(section, key)
        if not 0.0 < lo <= hi <= 1.0:
            raise MethodConfigError(f"method.{key}: need 0 < low <= high <= 1, got {getattr(section, key)}")
    for key in ("color_jitter", "grayscale"):
        if not 0.0 <= getattr(section, key) <= 1.0:
            raise MethodConfigError(f"method.{key}: a probability in [0, 1] is expected, got {getattr(section, key)}")
    n = len(per_view.split(", "))
    for key in ("blur", "solarize"):
        value = getattr(section, key)
        if len(value) != n or not all(0.0 <= p <= 1.0 for p in value):
            raise MethodConfigError(f"method.{key}: {n} probabilities in [0, 1] are expected ({per_view}), got {value}")


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
    """Hidden representations also distilled, as mae-lite's distill_hidden_idx: i (0..depth, the same in student
    and teacher) is the representation after i blocks read through a LayerNorm (block i's norm1; after the last
    block the final norm), mapped to the teacher's width by a Linear without bias; empty = off."""
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
        _check_ema(self)
        if min(self.dim, self.mlp_dim, self.proj_layers, self.pred_layers) < 1:
            raise MethodConfigError("method.dim, mlp_dim, proj_layers and pred_layers must be >= 1")
        _check_augmentation(self, "view 1, view 2")

    def views(self) -> List["ViewConfig"]:
        from pipelines.config import ViewConfig

        return [ViewConfig(crop_scale=self.crop_scale, color_jitter=self.color_jitter, grayscale=self.grayscale,
                           blur=self.blur[i], solarize=self.solarize[i]) for i in range(2)]


@register("dino", "fastvit_pt.methods.dino")
@dataclass
class DINOConfig(MethodConfig):
    """DINO (facebookresearch/dino): self-distillation from an EMA teacher over 2 global and N local crops."""

    name: str = "dino"
    """The training method (`fastvit models` lists them)."""
    out_dim: int = 65536
    """Prototypes: the output dimension of the DINO head (DINO's --out_dim)."""
    hidden_dim: int = 2048
    """Hidden width of the head's MLP."""
    bottleneck_dim: int = 256
    """The head's bottleneck, L2-normalised before the weight-normalised last layer."""
    head_layers: int = 3
    """Linear layers of the head's MLP (GELU between); at least 2 here (DINO also allows 1: a single Linear)."""
    norm_last_layer: bool = True
    """Fix the last layer's weight-norm scale g at 1 (DINO's --norm_last_layer; false for DINO's ViT-S/16 runs)."""
    momentum: float = 0.996
    """Teacher EMA momentum at step 0, rising to momentum_end on a half-cosine per iteration (--momentum_teacher)."""
    momentum_end: float = 1.0
    """Teacher EMA momentum at the last step."""
    student_temp: float = 0.1
    """Temperature of the student's softmax."""
    teacher_temp: float = 0.07
    """Temperature of the teacher's softmax after the warm-up (--teacher_temp)."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at epoch 0, rising linearly per epoch to teacher_temp (--warmup_teacher_temp)."""
    warmup_teacher_temp_epochs: int = 30
    """Epochs of the teacher temperature's warm-up (--warmup_teacher_temp_epochs)."""
    center_momentum: float = 0.9
    """EMA momentum of the centre subtracted from the teacher's outputs."""
    freeze_last_layer: int = 1
    """Epochs during which the head's last layer is not updated (--freeze_last_layer)."""
    global_scale: Tuple[float, float] = (0.4, 1.0)
    """Random-resized-crop area range of the 2 global crops, at model.img_size (--global_crops_scale)."""
    local_crops: int = 10
    """Local crops per image (--local_crops_number; 10 in DINO's ViT-S recipe)."""
    local_scale: Tuple[float, float] = (0.05, 0.4)
    """Random-resized-crop area range of the local crops (--local_crops_scale)."""
    local_size: int = 96
    """Side of the local crops in pixels (96 for a 224-px model); a multiple of model.patch_size."""
    color_jitter: float = 0.8
    """Probability of colour jitter (0.4, 0.4, 0.2, 0.1) in every crop."""
    grayscale: float = 0.2
    """Probability of grayscale in every crop."""
    blur: Tuple[float, float, float] = (1.0, 0.1, 0.5)
    """Probability of a Gaussian blur (sigma 0.1..2 px) in global crop 1, global crop 2 and each local crop."""
    solarize: Tuple[float, float, float] = (0.0, 0.2, 0.0)
    """Probability of solarisation in global crop 1, global crop 2 and each local crop."""

    def validate(self) -> None:
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, key) <= 0:
                raise MethodConfigError(f"method.{key} must be > 0, got {getattr(self, key)}")
        _check_ema(self)
        _check_fraction("center_momentum", self.center_momentum, low_open=False)
        if min(self.out_dim, self.hidden_dim, self.bottleneck_dim) < 1 or self.head_layers < 2:
            raise MethodConfigError("method.out_dim, hidden_dim and bottleneck_dim must be >= 1 and head_layers >= 2")
        if min(self.warmup_teacher_temp_epochs, self.freeze_last_layer, self.local_crops) < 0:
            raise MethodConfigError("method.warmup_teacher_temp_epochs, freeze_last_layer and local_crops must be >= 0")
        if self.local_crops and self.local_size < 1:
            raise MethodConfigError(f"method.local_size must be >= 1 px with {self.local_crops} local crops, got "
                                    f"{self.local_size}")
        _check_augmentation(self, "global crop 1, global crop 2, local crops", ("global_scale", "local_scale"))

    def views(self) -> List["ViewConfig"]:
        """DINO's DataAugmentationDINO: 2 global crops at the model's size, then local_crops local ones; flip,
        jitter and grayscale in every crop; blur and solarize per kind of crop."""
        from pipelines.config import ViewConfig

        def crop(i: int, size: int, scale) -> "ViewConfig":
            return ViewConfig(size=size, crop_scale=tuple(scale), color_jitter=self.color_jitter,
                              grayscale=self.grayscale, blur=self.blur[i], solarize=self.solarize[i])

        return [crop(0, 0, self.global_scale), crop(1, 0, self.global_scale)] + [
            crop(2, self.local_size, self.local_scale) for _ in range(self.local_crops)]


@register("simmim", "fastvit_pt.methods.simmim")
@dataclass
class SimMIMConfig(MethodConfig):
    """SimMIM (microsoft/SimMIM): mask-token in-painting of large masked blocks, a one-layer pixel head, L1 loss."""

    name: str = "simmim"
    """The training method (`fastvit models` lists them)."""
    mask_ratio: float = 0.6
    """Fraction of the mask cells replaced by the mask token (SimMIM's DATA.MASK_RATIO)."""
    mask_patch_size: int = 32
    """Side of a mask cell in pixels (DATA.MASK_PATCH_SIZE): a multiple of model.patch_size dividing model.img_size."""

    def validate(self) -> None:
        _check_fraction("mask_ratio", self.mask_ratio)
        if self.mask_patch_size < 1:
            raise MethodConfigError(f"method.mask_patch_size must be >= 1 (pixels), got {self.mask_patch_size}")


# old layouts (before methods owned their sections): `finetune:` and `distill:` were top-level sections
LEGACY_SECTIONS = ("finetune", "distill")


def switch_section(old: MethodConfig, name: str, drop: bool = False) -> MethodConfig:
    """`old` as method `name`'s section: shared fields set away from their default keep their values, those at
    the old default take the new section's (MAE's mask_ratio 0.75 is not SimMIM's 0.6); a field the new section
    lacks must be at its default or it is an error, never silently dropped (drop=True: dropped, for a deliberate
    comparison such as D-MAE's recipe as plain MAE)."""
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
            if value != getattr(defaults, f.name):
                setattr(new, f.name, value)
        elif value != getattr(defaults, f.name) and not drop:
            raise MethodConfigError(f"method.{f.name}={value!r} is a setting of method {old.name!r}, which method "
                                    f"{name!r} does not have; start from a recipe for method {name!r}, or one that "
                                    f"leaves method.{f.name} at its default")
    new.name = name
    return new
