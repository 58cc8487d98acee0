"""Typed configuration: code defaults < recipe YAML < dotted CLI overrides (`optim.blr=1e-4`).

Every component has a dataclass, one docstring line per field. An unknown key anywhere is an error that
names the key and suggests the closest valid one. Runtime objects (rank, device, a teacher module) are
build arguments, never fields. This module imports no torch, so `fastvit config` answers quickly.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from pipelines.config import PipelineConfig

from .methods.configs import LEGACY_SECTIONS, MAEConfig, MethodConfig, MethodConfigError, section_class, switch_section

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ENGINES = ("torch", "deepspeed")
ATTN_IMPLS = ("auto", "sdpa", "math")
OPTIMIZERS = ("adamw", "sgd")
CLIP_MODES = ("norm", "param")


class ConfigError(ValueError):
    """Bad user configuration: the message names the key or file at fault."""


@dataclass
class ModelConfig:
    name: str = "mae_vit_tiny_patch16"
    """A registered model (`fastvit models` lists them)."""
    img_size: int = 224
    """Input resolution in pixels; also the crop size of the training pipeline."""
    patch_size: int = 16
    """Patch side in pixels; img_size must be a multiple of it."""
    in_chans: int = 3
    """Input channels."""
    attn_impl: str = "auto"
    """sdpa (fused kernels), math (explicit softmax(QK^T)V), or auto: the faster one measured for the device and dtype."""
    drop_path: float = 0.0
    """Stochastic depth rate of the encoder (MAE pre-training uses 0)."""


@dataclass
class EvalConfig:
    path: str = ""
    """Held-out images (class-folder tree, or .beton) scored during training (a classifier's top-1, and the k-NN
    monitor's queries); empty = no evaluation."""
    every_epochs: int = 1
    """Epochs between evaluations; the last epoch is always evaluated."""
    micro_batch: int = 256
    """Images per evaluation forward pass on one rank."""
    knn_every_epochs: int = 0
    """Epochs between k-NN monitor scores of the backbone (any method; k, temperature from knn:); 0 = off; the
    last epoch is always scored. Needs eval.path (the queries)."""
    knn_train: str = ""
    """The k-NN monitor's bank images (class-folder tree, or .beton); empty = data.path."""
    knn_train_samples: int = 10000
    """At most this many bank images: a fixed random subset drawn from train.seed, the same at every score; 0 = all."""


@dataclass
class KnnConfig:
    """fastvit knn: weighted k-NN on frozen features (DINO's protocol, as mae-lite's analysis runs it)."""

    k: int = 20
    """Neighbours that vote."""
    temperature: float = 0.07
    """Each neighbour votes with weight exp(cosine similarity / temperature)."""
    batch: int = 256
    """Images per feature-extraction forward pass."""


@dataclass
class LinprobeConfig:
    """fastvit linprobe: BatchNorm without affine + one linear layer on frozen features (MAE's probe)."""

    epochs: int = 90
    """Probe epochs over the cached features."""
    blr: float = 0.1
    """Base lr; lr = blr x batch / 256. MAE: 0.1 at batch 16384 (lr 6.4); LARS at small batches needs a larger blr."""
    batch: int = 256
    """Probe batch (and feature-extraction batch)."""
    optimizer: str = "lars"
    """lars (MAE's) or sgd."""
    warmup_epochs: int = 10
    """Linear warm-up, then half-cosine, per iteration."""


@dataclass
class OptimConfig:
    blr: float = 1.5e-4
    """Base learning rate; the applied peak is blr * train.global_batch / 256."""
    lr: Optional[float] = None
    """Absolute peak learning rate; overrides blr when set."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay (never applied to biases, norms or other 1-D parameters)."""
    betas: Tuple[float, float] = (0.9, 0.95)
    """AdamW betas; MAE uses 0.95 for beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_epochs: float = 40.0
    """Linear warm-up length, applied per iteration."""
    weight_decay_end: Optional[float] = None
    """Weight decay at the last step, reached on a half-cosine from weight_decay per iteration (DINO: 0.04 -> 0.4);
    null keeps weight_decay constant."""
    clip_grad: Optional[float] = None
    """Clip gradients to this norm; null disables."""
    clip_mode: str = "norm"
    """norm: the global norm of all gradients (timm, MAE); param: each parameter's own norm (DINO's
    clip_gradients; the torch engine only: DeepSpeed clips the global norm)."""
    optimizer: str = "adamw"
    """adamw, or sgd (momentum, Nesterov: mae-lite's transfer recipe)."""
    momentum: float = 0.9
    """optimizer=sgd: momentum."""
    nesterov: bool = True
    """optimizer=sgd: Nesterov momentum."""
    fused: Union[bool, str, None] = "auto"
    """AdamW (and SGD) implementation: true = fused kernel, false = foreach, null = fused on CUDA else foreach,
    auto = the faster one measured for this run (engine/policy.py)."""


@dataclass
class EngineConfig:
    kind: str = "torch"
    """Training engine: torch (one process, or DDP under torchrun) or deepspeed (ZeRO; under torchrun or the
    deepspeed launcher, or one process)."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when available)."""
    precision: str = "auto"
    """Autocast dtype: bf16, fp16 (dynamic loss scaling; CUDA only), fp32, or auto: the faster of bf16 and fp32
    measured for this run's model step on this device, together with model.attn_impl and optim.fused when they
    are auto too (engine/policy.py; without a measurement: bf16 where it is native, else fp32)."""
    compile: Union[bool, str] = "auto"
    """Wrap the method in torch.compile: true, false, or auto: on when the run is long enough for the measured
    per-step saving to repay the measured compile time twice (engine/policy.py)."""
    zero_stage: int = 1
    """engine.kind=deepspeed: ZeRO stage 0 (replicated), 1 (optimizer state partitioned) or 2 (+ gradients)."""
    deepspeed_config: Optional[str] = None
    """engine.kind=deepspeed: a JSON file merged into the generated DeepSpeed config; it may add keys, and a key
    that contradicts the recipe is an error."""
    dist_timeout_s: int = 600
    """Seconds a collective waits for a missing peer before the run fails: a dead rank is an error, not a hang."""


@dataclass
class TrainConfig:
    epochs: int = 400
    """Length of the schedule in epochs."""
    global_batch: int = 4096
    """Images per optimizer step over all ranks; accumulation = global_batch / (micro_batch * world_size)."""
    micro_batch: int = 64
    """Images per forward pass on one rank."""
    seed: int = 0
    """Seeds data order, augmentation and masking; a run is a function of it."""
    out_dir: str = ""
    """Run directory; empty means runs/<recipe name>."""
    log_every: int = 50
    """Optimizer steps between metric logs (each log is one host-device sync)."""
    save_every_epochs: int = 1
    """Epochs between checkpoints; the last epoch is always saved."""
    keep_checkpoints: int = 2
    """How many epoch checkpoints to keep on disk (older ones are deleted)."""
    stop_after_epochs: Optional[int] = None
    """Exit cleanly after this many epochs in this invocation (time-limited cluster jobs); resume continues."""
    tensorboard: bool = True
    """Write TensorBoard scalars beside metrics.jsonl."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MAEConfig)
    data: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linprobe: LinprobeConfig = field(default_factory=LinprobeConfig)

    def validate(self) -> "Config":
        m, e, t = self.model, self.engine, self.train
        if m.img_size % m.patch_size:
            raise ConfigError(f"model.img_size ({m.img_size}) must be a multiple of model.patch_size ({m.patch_size})")
        if m.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"model.attn_impl: expected one of {', '.join(ATTN_IMPLS)}, got {m.attn_impl!r}")
        try:
            self.method.validate()
        except MethodConfigError as err:
            raise ConfigError(str(err)) from None
        if self.eval.every_epochs < 1 or self.eval.micro_batch < 1:
            raise ConfigError("eval.every_epochs and eval.micro_batch must be >= 1")
        if self.eval.knn_every_epochs < 0 or self.eval.knn_train_samples < 0:
            raise ConfigError(f"eval.knn_every_epochs and eval.knn_train_samples must be >= 0 (0: off, all), got "
                              f"{self.eval.knn_every_epochs} and {self.eval.knn_train_samples}")
        if self.eval.knn_every_epochs and not self.eval.path:
            raise ConfigError(f"eval.knn_every_epochs={self.eval.knn_every_epochs} needs eval.path: the held-out "
                              "images the k-NN monitor scores (e.g. eval.path=data/fmnist/test)")
        if self.knn.k < 1 or self.knn.temperature <= 0 or self.knn.batch < 1:
            raise ConfigError(f"knn: need k >= 1, temperature > 0 and batch >= 1, got {self.knn}")
        lp = self.linprobe
        if lp.optimizer not in ("lars", "sgd"):
            raise ConfigError(f"linprobe.optimizer: expected lars or sgd, got {lp.optimizer!r}")
        if lp.epochs < 1 or lp.batch < 1 or lp.warmup_epochs < 0 or lp.blr <= 0:
            raise ConfigError(f"linprobe: need epochs >= 1, batch >= 1, warmup_epochs >= 0 and blr > 0, got {lp}")
        o = self.optim
        if o.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {o.optimizer!r}")
        if o.clip_mode not in CLIP_MODES:
            raise ConfigError(f"optim.clip_mode: expected one of {', '.join(CLIP_MODES)}, got {o.clip_mode!r}")
        if o.clip_grad is not None and o.clip_grad <= 0:
            raise ConfigError(f"optim.clip_grad must be > 0 (null disables clipping), got {o.clip_grad}")
        if o.weight_decay < 0 or (o.weight_decay_end is not None and o.weight_decay_end < 0):
            raise ConfigError(f"optim.weight_decay and optim.weight_decay_end must be >= 0, got {o.weight_decay} and "
                              f"{o.weight_decay_end}")
        if o.weight_decay_end is not None and o.weight_decay == 0:
            raise ConfigError(f"optim.weight_decay_end={o.weight_decay_end} needs optim.weight_decay > 0: the cosine "
                              "starts there, and each parameter group decays in proportion to it (biases and norms "
                              "not at all)")
        if o.clip_mode != "norm" and o.clip_grad is None:
            warnings.warn(f"optim.clip_mode={o.clip_mode} has no effect without optim.clip_grad", stacklevel=2)
        if e.kind not in ENGINES:
            raise ConfigError(f"engine.kind: expected one of {', '.join(ENGINES)}, got {e.kind!r}")
        if e.zero_stage not in (0, 1, 2):
            raise ConfigError(f"engine.zero_stage: expected 0, 1 or 2, got {e.zero_stage!r}")
        if e.dist_timeout_s < 1:
            raise ConfigError(f"engine.dist_timeout_s must be >= 1, got {e.dist_timeout_s}")
        if e.kind != "deepspeed" and e.deepspeed_config:
            warnings.warn(f"engine.deepspeed_config={e.deepspeed_config!r} has no effect with engine.kind={e.kind}",
                          stacklevel=2)
        if e.precision not in PRECISIONS:
            raise ConfigError(f"engine.precision: expected one of {', '.join(PRECISIONS)}, got {e.precision!r}")
        if e.compile not in (True, False, "auto"):
            raise ConfigError(f"engine.compile: expected true, false or auto, got {e.compile!r}")
        if self.optim.fused not in (True, False, None, "auto"):
            raise ConfigError(f"optim.fused: expected true, false, null or auto, got {self.optim.fused!r}")
        if e.device not in ("auto", "cpu", "cuda") and not e.device.startswith("cuda:"):
            raise ConfigError(f"engine.device: expected auto, cpu or cuda, got {e.device!r}")
        for key in ("epochs", "global_batch", "micro_batch", "log_every", "save_every_epochs", "keep_checkpoints"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        if t.global_batch % t.micro_batch:
            raise ConfigError(
                f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch ({t.micro_batch})"
            )
        if self.optim.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.optim.warmup_epochs}")
        if self.optim.warmup_epochs > t.epochs:
            warnings.warn(
                f"optim.warmup_epochs ({self.optim.warmup_epochs:g}) exceeds train.epochs ({t.epochs}): "
                "the learning rate never reaches its peak",
                stacklevel=2,
            )
        try:
            self.data.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return self

    def check_paths(self) -> "Config":
        """Every path a run reads must exist: checked before torch is imported, so a typo answers at once, and
        every missing path is named in one message. (Not part of validate(): a checkpoint's stored config names
        paths of the machine that trained it.)"""
        if not self.data.path:
            raise ConfigError("data.path is not set: the training images (a class-folder tree, or a .beton for "
                              "data.backend=ffcv), e.g. data.path=data/fmnist/train")
        data, missing = Path(self.data.path), []
        if self.data.backend == "ffcv":
            if not data.is_file():
                missing.append(f"data.backend=ffcv reads a .beton file, and {data} is not one; make it with: "
                               f"fastvit convert SRC {data}")
        elif not data.is_dir():
            missing.append(f"data folder not found: {data} (data.path; expected ROOT/<class>/<image> files)")
        for key, value in (("eval.path", self.eval.path), ("eval.knn_train", self.eval.knn_train),
                           ("engine.deepspeed_config", self.engine.deepspeed_config),
                           *self.method.paths().items()):
            if value and not Path(value).exists():
                missing.append(f"{key}: not found: {value}")
        if missing:
            raise FileNotFoundError("; ".join(missing))
        return self

    @property
    def peak_lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else self.optim.blr * self.train.global_batch / 256


# ----------------------------------------------------------------------------------------------------
# loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`, converting only where it is lossless."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for i, a in enumerate(inner):  # the first type that takes the value (bool before str: compile: true)
            try:
                return _coerce(value, a, key)
            except ConfigError:
                if i == len(inner) - 1:
                    raise ConfigError(f"{key}: expected {' or '.join(_type_name(x) for x in inner)}, got {value!r} "
                                      f"({type(value).__name__})") from None
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _unknown_key(key: str, valid: List[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}{key}'{hint} Valid keys here: {', '.join(valid)}")


def _merge(obj: Any, data: Dict[str, Any], where: str = "") -> None:
    """Write the mapping `data` into the dataclass `obj`, validating every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        if key not in names:
            if where == "" and key in LEGACY_SECTIONS:
                raise ConfigError(f"the '{key}:' section is now part of 'method:' (e.g. {key}.{_LEGACY_EXAMPLE[key]} is "
                                  f"method.{_LEGACY_EXAMPLE[key]}); move its keys there")
            err = _unknown_key(str(key), names, where)
            if isinstance(obj, MethodConfig):  # a key of another method's section: say whose section this is
                raise ConfigError(f"method {obj.name!r} has no setting '{key}': {err}")
            raise err
        current = getattr(obj, key)
        if isinstance(current, MethodConfig):
            setattr(obj, key, _merge_method(current, value, f"{where}{key}."))
        elif dataclasses.is_dataclass(current):
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}{key}"))


_LEGACY_EXAMPLE = {"finetune": "init", "distill": "teacher"}


def _merge_method(current: MethodConfig, data: Dict[str, Any], where: str) -> MethodConfig:
    """A method section: its `name` picks the dataclass (the method's own section) before the other keys land."""
    if isinstance(data, dict) and "name" in data:
        name = _coerce(data["name"], str, f"{where}name")
        if section_class(name) is None:
            from .methods.configs import method_names

            close = difflib.get_close_matches(name, method_names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}name: unknown method {name!r}{hint} Known methods: {', '.join(method_names())}")
        try:
            current = switch_section(current, name)
        except MethodConfigError as err:
            raise ConfigError(str(err)) from None
        data = {k: v for k, v in data.items() if k != "name"}
    _merge(current, data, where)
    return current


def _read_recipe(path: Path, seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """Read a recipe; a top-level `base: other.yaml` (relative to the recipe) is read first, then updated
    (except train.out_dir, which is never inherited)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: recipe 'base' chain loops back on itself")
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_recipe(path.parent / base, seen + (path,))
    # a run directory belongs to one recipe: a derived recipe runs in runs/<its own name> unless it names one
    (merged.get("train") or {}).pop("out_dir", None)
    _deep_update(merged, data)
    return merged


def _deep_update(dst: Dict[str, Any], src: Dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    """`["optim.blr=1e-4", "data.path=/x"]` -> nested dict, values parsed as YAML scalars."""
    out: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (for example optim.blr=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty part in key {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def load_config(recipe: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> Config:
    cfg = Config()
    if recipe is not None:
        _merge(cfg, _read_recipe(Path(recipe)))
        if not cfg.train.out_dir:
            cfg.train.out_dir = str(Path("runs") / Path(recipe).stem)
    if overrides:
        _merge(cfg, parse_overrides(overrides))
    if not cfg.train.out_dir:
        cfg.train.out_dir = "runs/default"
    return cfg.validate()


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
    """`KEY=VALUE` overrides written into an existing config (a run's own, say), then validated."""
    if overrides:
        _merge(cfg, parse_overrides(list(overrides)))
    return cfg.validate()


def config_from_dict(data: Dict[str, Any]) -> Config:
    """A stored config (a run's config.yaml, a checkpoint's): older runs kept `finetune:` and `distill:` as
    top-level sections; their keys are read into the method's own section."""
    data = dict(data)
    if any(section in data for section in LEGACY_SECTIONS):
        # the old layout stored every section whatever the method (a fine-tune's config kept MAE's mask_ratio):
        # the method's own section takes what belongs to it, from the old method section and the old sections
        method = dict(data.get("method") or {})
        cls = section_class(method.get("name", "mae"))
        keep = {f.name for f in dataclasses.fields(cls)} if cls is not None else set(method)
        merged = {k: v for k, v in method.items() if k in keep}
        for section in LEGACY_SECTIONS:
            merged.update({k: v for k, v in (data.pop(section, None) or {}).items() if k in keep})
        data["method"] = merged
    cfg = Config()
    _merge(cfg, data)
    return cfg.validate()


def to_dict(cfg: Config) -> Dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for the short lists of numbers ([0.9, 0.95])."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(cfg: Config) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
