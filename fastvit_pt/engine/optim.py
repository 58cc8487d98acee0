"""Parameter groups, AdamW and the per-iteration learning-rate schedule."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch
import torch.nn as nn


def param_groups(module: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> List[Dict]:
    """Two groups: decayed weights (matrices, conv kernels) and undecayed biases, norms and other 1-D
    params (MAE's add_weight_decay). `skip` names further parameters to leave undecayed (fine-tuning
    skips pos_embed and cls_token); pre-training decays the 3-D tokens, as MAE does."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip or name.rsplit(".", 1)[-1] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]


def build_adamw(groups: List[Dict], lr: float, betas, eps: float, device: torch.device, fused=None):
    """AdamW; fused=None picks the fused kernel on CUDA and the foreach one elsewhere."""
    if fused is None:
        fused = device.type == "cuda"
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


class WarmupCosine:
    """lr(step): linear from 0 over `warmup` steps, then half-cosine from `peak` to `floor` at `total`."""

    def __init__(self, peak: float, total: int, warmup: int, floor: float = 0.0):
        if total < 1:
            raise ValueError(f"schedule needs at least one step, got total={total}")
        self.peak, self.total, self.warmup, self.floor = peak, total, min(warmup, total), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * step / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
