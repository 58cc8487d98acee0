"""Plain-torch engine: one process or DDP (under torchrun), autocast, accumulation, clipping, AdamW."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..engine.checkpoint import CheckpointError, save_checkpoint
from ..engine.optim import clip_per_parameter_
from .base import Engine


class TorchEngine(Engine):
    kind = "torch"

    def __init__(self, method, plan, engine_cfg, optim_cfg):
        super().__init__(method, plan, engine_cfg, optim_cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        model: nn.Module = self.module
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if plan.compile:  # engine.compile, resolved for this run (engine/policy.py)
            model = torch.compile(model)
        self.model = model

    def _syncs_this_micro_step(self) -> bool:
        return (self.micro_step + 1) % self.accum == 0

    def __call__(self, batch) -> Dict[str, torch.Tensor]:
        # DDP decides at forward time whether the coming backward all-reduces
        no_sync = self.env.distributed and not self._syncs_this_micro_step()
        with (self.model.no_sync() if no_sync else contextlib.nullcontext()), self.autocast, self.kernels():
            return self.model(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accum).backward()

    def step(self) -> bool:
        """Count a micro-step; on an accumulation boundary, clip, step the optimizer and zero grads."""
        self.micro_step += 1
        if self.micro_step % self.accum:
            return False
        self._set_lr_for_this_step()
        clip = self.clip_grad
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            if self.clip_mode == "param":
                self.grad_norm = clip_per_parameter_(self.module.parameters(), clip)
            else:
                self.grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return True

    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.counters(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self._load_counters(state)

    def save(self, path: Path, meta: Dict[str, Any]) -> Optional[Path]:
        """One file, written by rank 0 (DDP keeps every rank's model and optimizer identical)."""
        if not self.env.is_main:
            return None
        return save_checkpoint(path, {**meta, "engine": self.state_dict()})

    def load(self, path: Path, meta: Dict[str, Any]) -> None:
        if "model" not in meta["engine"]:
            raise CheckpointError(
                f"{path} was written by the {meta.get('engine_kind', 'deepspeed')} engine; resume it with "
                f"engine.kind={meta.get('engine_kind', 'deepspeed')}"
            )
        self.load_state_dict(meta["engine"])
