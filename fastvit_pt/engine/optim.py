"""Parameter groups, AdamW and the per-iteration learning-rate schedule."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Tuple

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


def build_optimizer(groups: List[Dict], o, lr: float, device: torch.device, fused=None) -> torch.optim.Optimizer:
    """The optimizer `o` (an OptimConfig) names over `groups`: AdamW, or SGD with (Nesterov) momentum.

    Besides torch's keys a group may carry `lr_scale` (its share of the scheduled lr: layer decay) and
    `frozen_steps` (lr 0 for the first N optimizer steps: DINO's frozen last layer); `wd_scale` (its share of the
    scheduled weight decay) is set here from the weight decay the method gave it. `fused`: the kernel the run
    plan resolved (None: fused on CUDA, foreach elsewhere)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]  # names are for people, not torch
    for g in groups:
        g.setdefault("wd_scale", g["weight_decay"] / o.weight_decay if o.weight_decay else 0.0)
    if o.optimizer == "sgd":
        kw = {"fused": True} if (device.type == "cuda" if fused is None else fused) else {"foreach": True}
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, **kw)
    return build_adamw(groups, lr, o.betas, o.eps, device, fused)


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


class CosineValue:
    """A value on a half-cosine per iteration, `start` at step 0 to `end` at `total` (DINO's cosine_scheduler
    without warm-up: its weight-decay and teacher-momentum schedules)."""

    def __init__(self, start: float, end: float, total: int):
        self.start, self.end, self.total = start, end, max(1, total)

    def __call__(self, step: int) -> float:
        t = min(step, self.total) / self.total
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int = 0, weight_decay: "float | None" = None) -> None:
    """Each group's lr for optimizer step `step` (0-based): lr x lr_scale, or 0 while the group is frozen; with
    weight_decay, each group's decay as weight_decay x wd_scale (a scheduled decay)."""
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if step < g.get("frozen_steps", 0) else lr * g.get("lr_scale", 1.0)
        if weight_decay is not None:
            g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)


@torch.no_grad()
def clip_per_parameter_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """DINO's utils.clip_gradients: each parameter's gradient scaled to norm <= max_norm on its own (coefficient
    max_norm / (norm + 1e-6) where below 1). Returns the global norm before clipping, for the log."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    coefs = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
    return total


def vit_layer_id(name: str, depth: int) -> int:
    """MAE/BEiT layer index of a ViT parameter: 0 for the embeddings (cls token, position, patches), i + 1 for
    block i, depth + 1 for everything after the blocks (norms, head)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, depth: int,
                       no_decay: Iterable[str] = ("pos_embed", "cls_token")) -> List[Dict]:
    """Fine-tuning parameter groups with layer-wise lr decay (MAE's param_groups_lrd): a parameter at layer
    id l gets lr_scale = layer_decay ** (depth + 1 - l), so the head trains at the full rate, block i at
    decay^(depth - i) and the embeddings at decay^(depth + 1). No weight decay on biases, norms (1-D) and the
    `no_decay` names. `set_lr` applies the scales."""
    skip = set(no_decay)
    groups: Dict[Tuple[int, bool], Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        lid = vit_layer_id(name, depth)
        g = groups.setdefault((lid, decays), {
            "params": [], "names": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid,
        })
        g["params"].append(p)
        g["names"].append(name)
    return [groups[key] for key in sorted(groups)]
