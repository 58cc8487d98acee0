"""What every engine shares: the interface the loop drives, precision, accumulation, AdamW, the schedule
and the exported backbone. The loop drives every engine the same way:

    out = engine(batch); engine.backward(out["loss"]); stepped = engine.step()
    engine.save(path, meta)   # collective: every rank calls it
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..config import Config
from ..engine.checkpoint import save_checkpoint
from ..engine.optim import WarmupCosine, build_optimizer, param_groups, set_lr
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


def backbone(method: nn.Module) -> nn.Module:
    """The module downstream tasks keep (timm-compatible keys): `method.encoder()` where a method has one."""
    get = getattr(method, "encoder", None)
    return get() if callable(get) else method


class Engine:
    """Shared set-up; subclasses wrap `self.module` and implement the five calls the loop makes."""

    kind = "base"
    checkpoint_is_dir = False  # a checkpoint is one file (torch) or one directory per save (deepspeed)

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
        # a method may bring its own groups (fine-tuning: layer-wise lr decay); else decay / no-decay
        own_groups = getattr(method, "param_groups", None)
        groups = own_groups(o.weight_decay) if callable(own_groups) else param_groups(self.module, o.weight_decay)
        self.optimizer = build_optimizer(groups, o, cfg.peak_lr, self.device)
        total = cfg.train.epochs * steps_per_epoch
        self.schedule = WarmupCosine(cfg.peak_lr, total, int(round(o.warmup_epochs * steps_per_epoch)), o.min_lr)
        self.micro_step = 0
        self.global_step = 0
        self.grad_norm: Optional[torch.Tensor] = None
        self.lr = self.schedule(0)

    @property
    def autocast(self):
        """Context for the forward pass in the compute dtype (nothing to do in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def kernels(self):
        """Context for the forward pass. On CUDA, scaled_dot_product_attention may only use fused kernels
        (flash, memory-efficient, cuDNN): inputs they cannot take fail loudly instead of silently running the
        O(N^2)-memory math fallback."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])

    def _set_lr_for_this_step(self) -> None:
        self.lr = self.schedule(self.global_step)
        set_lr(self.optimizer, self.lr)

    def counters(self) -> Dict[str, int]:
        return {"global_step": self.global_step, "micro_step": self.micro_step}

    def _load_counters(self, state: Dict[str, Any]) -> None:
        self.global_step, self.micro_step = state["global_step"], state["micro_step"]
        self.lr = self.schedule(self.global_step)

    def backbone_state_dict(self) -> Dict[str, torch.Tensor]:
        """The backbone's weights in fp32 on the CPU, timm-compatible keys."""
        return {k: v.detach().float().cpu() for k, v in backbone(self.module).state_dict().items()}

    def export(self, path: Path, checkpoint: Optional[Path] = None) -> Optional[Path]:
        """Write the backbone as a plain state dict (loads into timm's VisionTransformer). Every rank calls it,
        after `save` wrote `checkpoint`."""
        return save_checkpoint(path, self.backbone_state_dict()) if self.env.is_main else None
