"""Plain-torch engine: one process or DDP (under torchrun), autocast, accumulation, clipping, AdamW.

The loop drives every engine the same way:
    out = engine(batch); engine.backward(out["loss"]); engine.step()
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..config import Config
from ..engine.optim import WarmupCosine, build_adamw, param_groups, set_lr
from .env import DistEnv, resolve_precision

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"train.global_batch ({global_batch}) is not a multiple of train.micro_batch ({micro_batch}) x world size "
            f"({world_size}) = {per_step}; choose micro_batch so that global_batch / (micro_batch * world_size) is whole"
        )
    return global_batch // per_step


class TorchEngine:
    def __init__(self, method: nn.Module, cfg: Config, env: DistEnv, steps_per_epoch: int):
        self.cfg, self.env = cfg, env
        self.device = env.device
        self.precision = resolve_precision(cfg.engine.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("engine.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
        self.dtype = DTYPES[self.precision]
        self.accum = accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, env.world_size)
        self.module = method.to(self.device)
        o = cfg.optim
        self.optimizer = build_adamw(
            param_groups(self.module, o.weight_decay), cfg.peak_lr, o.betas, o.eps, self.device, o.fused
        )
        total = cfg.train.epochs * steps_per_epoch
        self.schedule = WarmupCosine(cfg.peak_lr, total, int(round(o.warmup_epochs * steps_per_epoch)), o.min_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        model: nn.Module = self.module
        if env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.engine.compile:
            model = torch.compile(model)
        self.model = model
        self.micro_step = 0
        self.global_step = 0
        self.grad_norm: Optional[torch.Tensor] = None
        self.lr = self.schedule(0)

    @property
    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _syncs_this_micro_step(self) -> bool:
        return (self.micro_step + 1) % self.accum == 0

    def __call__(self, batch) -> Dict[str, torch.Tensor]:
        # DDP decides at forward time whether the coming backward all-reduces
        no_sync = self.env.distributed and not self._syncs_this_micro_step()
        with (self.model.no_sync() if no_sync else contextlib.nullcontext()), self.autocast:
            return self.model(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accum).backward()

    def step(self) -> bool:
        """Count a micro-step; on an accumulation boundary, clip, step the optimizer and zero grads."""
        self.micro_step += 1
        if self.micro_step % self.accum:
            return False
        self.lr = self.schedule(self.global_step)
        set_lr(self.optimizer, self.lr)
        clip = self.cfg.optim.clip_grad
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
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
            "global_step": self.global_step,
            "micro_step": self.micro_step,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.micro_step = state["global_step"], state["micro_step"]
        self.lr = self.schedule(self.global_step)
