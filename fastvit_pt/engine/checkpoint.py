"""Checkpoints: written atomically (temporary file, fsync, rename), read with weights_only=True.

A torch-engine checkpoint is one file, `checkpoint-0001.pt`. A DeepSpeed checkpoint is a directory,
`checkpoint-0001/`, holding DeepSpeed's own files (the module, and each rank's ZeRO optimizer partition)
plus `fastvit.pt` (epoch, RNG states, config, counters), written last: a directory without it is an
interrupted save and is never resumed from. Beside each, `model-0001.pt` is the backbone alone, a plain
state dict with timm's keys.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)(\.pt)?$")
_MODEL = re.compile(r"^model-(\d+)\.pt$")
META = "fastvit.pt"  # inside a checkpoint directory; its presence marks the save complete


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not one of ours; the message names the file."""


def checkpoint_path(run_dir: str | Path, epoch: int, directory: bool = False) -> Path:
    return Path(run_dir) / (f"checkpoint-{epoch:04d}" if directory else f"checkpoint-{epoch:04d}.pt")


def model_path(run_dir: str | Path, epoch: int) -> Path:
    """The exported backbone saved with the checkpoint of `epoch`."""
    return Path(run_dir) / f"model-{epoch:04d}.pt"


def rng_state() -> Dict[str, Any]:
    """Every RNG this process draws from, as plain Python (bytes, ints): it pickles across ranks with
    all_gather_object and loads under weights_only=True."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": bytes(torch.get_rng_state().numpy()),
        "cuda": [bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(b) for b in state["cuda"]])


def _byte_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | Path, state: Dict[str, Any]) -> Path:
    """Write `state` so that `path` is either the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """A checkpoint file's whole state, or a checkpoint directory's `fastvit.pt` (the engine's own files are
    read by the engine)."""
    path = Path(path)
    if path.is_dir():
        if not (path / META).is_file():
            raise CheckpointError(
                f"{path} is not a complete checkpoint: it has no {META} (the save was interrupted, or this is "
                "not a fastvit checkpoint directory)"
            )
        return _read(path / META, map_location)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return _read(path, map_location)


def _read(path: Path, map_location) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip, pickle and EOF errors all mean the same thing to the user
        raise CheckpointError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes): it is truncated, corrupt or not a "
            f"PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(state, dict) or "engine" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a fastvit training checkpoint (no 'engine'/'epoch' entries)")
    return state


def exported_model(checkpoint: str | Path) -> Path:
    """The `model-NNNN.pt` written beside `checkpoint-NNNN[.pt]`."""
    checkpoint = Path(checkpoint)
    m = _NAME.match(checkpoint.name)
    if not m:
        raise CheckpointError(f"{checkpoint} is not named checkpoint-NNNN(.pt)")
    return model_path(checkpoint.parent, int(m.group(1)))


def method_state_dict(path: str | Path, state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The whole method's weights from a checkpoint `load_checkpoint` read: a file holds them itself; a
    DeepSpeed directory holds them in DeepSpeed's module file (replicated under ZeRO 0-2)."""
    path = Path(path)
    if not path.is_dir():
        return state["engine"]["model"]
    module_file = path / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise CheckpointError(f"{path} has no {module_file.name}: not a complete DeepSpeed checkpoint")
    try:
        # DeepSpeed stores its config and version objects beside the weights: not a weights-only pickle
        return torch.load(module_file, map_location="cpu", weights_only=False)["module"]
    except Exception as err:
        raise CheckpointError(f"cannot read {module_file}: {type(err).__name__}: {err}") from None


def _complete(p: Path) -> bool:
    return (p / META).is_file() if p.is_dir() else p.is_file()


def _numbered(run_dir: str | Path, pattern: re.Pattern):
    return sorted((int(m.group(1)), p) for p in Path(run_dir).glob("*") if (m := pattern.match(p.name)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or DeepSpeed checkpoint directory as it is; a run directory: its newest checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / META).is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        return found
    return path


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint (file or directory) in `run_dir`, or None."""
    found = [(n, p) for n, p in _numbered(run_dir, _NAME) if _complete(p)]
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints and exported models; delete older ones."""
    for pattern in (_NAME, _MODEL):
        found = _numbered(run_dir, pattern)
        for _, p in found[:-keep] if keep > 0 else []:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
