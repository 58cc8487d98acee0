"""Backbone import from the checkpoint layouts people have, and export to a file timm loads.

Import understands, from the file's own keys (loaded with weights_only=True):
- fastvit training checkpoints (a `.pt` file or a DeepSpeed directory, or a run directory: its newest),
  and the `model-NNNN.pt` backbones they export;
- facebookresearch/mae checkpoints: `{"model": {...}}` with the encoder at the top level beside `decoder_*`
  and `mask_token`;
- mae-lite checkpoints: `{"model": {"module.model.<MAE keys>", "module.teacher.*", "module.adapter.*"}}`;
- timm state dicts (plain, or under "state_dict").
Everything that is not the encoder is reported as ignored, by group; what the target model lacks or the
file lacks is reported as unexpected or missing, never silently dropped.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .checkpoint import (
    META,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    method_state_dict,
    resolve_checkpoint,
)

_DECODER = ("decoder_", "mask_token")


@dataclass
class ImportReport:
    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # in the model, not in the file: left as initialised
    unexpected: List[str] = field(default_factory=list)  # encoder-looking keys the model has no place for
    ignored: Dict[str, int] = field(default_factory=dict)  # group -> key count (decoder, teacher, ...)

    def __str__(self) -> str:
        lines = [f"{self.source}: {len(self.loaded)} tensors loaded"]
        if self.missing:
            lines.append(f"  missing (left as initialised): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (not loaded): {', '.join(self.unexpected)}")
        for group, n in sorted(self.ignored.items()):
            lines.append(f"  ignored: {n} {group} keys")
        return "\n".join(lines)


def _torch_load(path: Path) -> Dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read {path} as a weights-only PyTorch file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def read_backbone(path: str | Path) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, int]]:
    """(encoder state dict with timm keys, a description of the layout found, ignored key groups)."""
    path = resolve_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        state = load_checkpoint(path)
        return _split(method_state_dict(path, state), encoder_prefix(state), f"fastvit checkpoint {path}")
    raw = _torch_load(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict")
    if "engine" in raw and "epoch" in raw:
        return _split(method_state_dict(path, raw), encoder_prefix(raw), f"fastvit training checkpoint {path}")
    for key in ("model", "state_dict"):
        if key in raw and isinstance(raw[key], dict):
            raw = raw[key]
            break
    sd = {k: v for k, v in raw.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError(f"{path} has no tensors under 'model', 'state_dict' or at its top level")
    if all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped module
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("model.") for k in sd):  # mae-lite: model (MAE), teacher, adapter side by side
        inner = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        other = Counter(k.split(".", 1)[0] for k in sd if not k.startswith("model."))
        enc, desc, ignored = _split(inner, "encoder." if any(k.startswith("encoder.") for k in inner) else "",
                                    f"mae-lite checkpoint {path}")
        ignored.update({g: n for g, n in other.items()})
        return enc, desc, ignored
    if any(k.startswith("encoder.") for k in sd):  # a fastvit MaskedAutoencoderViT state dict
        return _split(sd, "encoder.", f"fastvit MAE state dict {path}")
    kind = "MAE checkpoint" if any(k.startswith(_DECODER) for k in sd) else "timm/ViT state dict"
    return _split(sd, "", f"{kind} {path}")


# checkpoints from before the prefix was recorded: fine-tuning kept the classifier at "model.", the MAE family
# its encoder at "model.encoder."
_UNRECORDED_PREFIX = {"finetune": "model."}


def encoder_prefix(state: Dict) -> str:
    """Where the backbone sits in a training checkpoint's method state dict: recorded by the method that wrote it
    (Method.encoder_prefix); older checkpoints by their method's layout then."""
    recorded = state.get("engine", {}).get("encoder_prefix")
    if recorded is not None:
        return recorded
    method = ((state.get("config") or {}).get("method") or {}).get("name", "mae")
    return _UNRECORDED_PREFIX.get(method, "model.encoder.")


def _group(key: str) -> str:
    """The ignored-key group a non-encoder key is counted under: decoder (MAE's, also under a wrapper such as
    our method's `model.`), else its first component."""
    parts = key.split(".")
    return "decoder" if any(p.startswith(_DECODER) for p in parts[:2]) else parts[0]


def _split(sd: Dict[str, torch.Tensor], prefix: str, desc: str):
    """Keys under `prefix` (stripped) that are not MAE decoder keys form the encoder; the rest is ignored."""
    enc, ignored = {}, Counter()
    for k, v in sd.items():
        name = k[len(prefix):] if k.startswith(prefix) else None
        if name is None or name.startswith(_DECODER):
            ignored[_group(k if name is None else name)] += 1
        else:
            enc[name] = v
    return enc, desc, dict(ignored)


def run_config(path: str | Path):
    """The fastvit Config of the run a checkpoint belongs to (its stored config, or the run directory's
    config.yaml beside an exported model-NNNN.pt), or None for checkpoints from elsewhere."""
    from ..config import config_from_dict

    def stored(yaml_path: Path):
        """A run's config.yaml is a stored config (older runs: the old section layout), not a recipe."""
        import yaml

        return config_from_dict(yaml.safe_load(yaml_path.read_text()) or {})

    path = Path(path)
    if path.is_dir() and not (path / META).is_file():
        if (path / "config.yaml").is_file():
            return stored(path / "config.yaml")
        path = latest_checkpoint(path) or path
    if path.is_dir() or path.name.startswith("checkpoint-"):
        try:
            return config_from_dict(load_checkpoint(path)["config"])
        except (CheckpointError, KeyError):
            return None
    beside = path.parent / "config.yaml"
    return stored(beside) if beside.is_file() else None


def load_backbone(model: nn.Module, path: str | Path) -> ImportReport:
    """Load the encoder weights found in `path` into `model` (a VisionTransformer). The classifier head and a
    final norm the model does not have (MAE's avg-pool fine-tuning uses a fresh fc_norm) are reported as
    ignored; a file that matches none of the model's blocks is an error."""
    sd, desc, ignored = read_backbone(path)
    own = model.state_dict()
    report = ImportReport(desc, ignored=dict(ignored))
    usable = {}
    for k, v in sd.items():
        if k.startswith("head.") or (k.startswith("norm.") and k not in own):
            group = "head (a fresh one is trained)" if k.startswith("head.") else "final norm (avg pool uses fc_norm)"
            report.ignored[group] = report.ignored.get(group, 0) + 1
        elif k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        else:
            usable[k] = v
    if not any(k.startswith("blocks.") for k in usable):
        raise CheckpointError(f"{path}: none of its {len(sd)} encoder tensors match the model's blocks ({desc})")
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in own if k not in usable)
    return report


def export_for_timm(model: nn.Module, path: str | Path) -> Path:
    """Write `model`'s weights (fp32, plain state dict, timm's keys) where
    timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=path)) reads them."""
    from .checkpoint import save_checkpoint

    return save_checkpoint(path, {k: v.detach().float().cpu() for k, v in model.state_dict().items()})
