"""Linear probe as MAE runs it: a BatchNorm without affine parameters, then one linear layer, trained on
frozen features with LARS (or SGD), no weight decay, warm-up then cosine.

One difference, for speed: the features are extracted once, without augmentation, and the probe trains
on them (MAE re-runs the frozen encoder on RandomResizedCrop + flip views every epoch). That makes a probe
seconds long on a CPU; it measures the same thing, a little optimistically for small data.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .knn import topk_accuracy


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as MAE's linear probe uses it:
    every parameter with more than one dimension has its update scaled by trust * ||w|| / ||g + wd * w||;
    1-D parameters (biases) get a plain momentum step."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    q = torch.where((w_norm > 0) & (d_norm > 0), g["trust_coefficient"] * w_norm / d_norm,
                                    torch.ones_like(w_norm))
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       num_classes: int, epochs: int = 90, batch: int = 256, blr: float = 0.1,
                       optimizer: str = "lars", warmup_epochs: int = 10, seed: int = 0,
                       momentum: float = 0.9) -> Dict:
    """Train BatchNorm(affine=False) + Linear on cached features; lr = blr x batch / 256, linear warm-up then
    half-cosine per iteration. Returns the final test top-1/top-5 and the train loss curve (one per epoch)."""
    if optimizer not in ("lars", "sgd"):
        raise ValueError(f"linear probe optimizer: expected lars or sgd, got {optimizer!r}")
    g = torch.Generator().manual_seed(seed)
    dim = train_x.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.trunc_normal_(head[1].weight, std=0.01)  # MAE's probe init
    nn.init.zeros_(head[1].bias)
    lr = blr * batch / 256
    opt = LARS(head.parameters(), lr=lr, momentum=momentum) if optimizer == "lars" else \
        torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    n = train_x.shape[0]
    steps_per_epoch = max(1, n // batch)
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    losses, step = [], 0
    for _ in range(epochs):
        head.train()
        order = torch.randperm(n, generator=g)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            cur = lr * step / warm if step < warm else lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for pg in opt.param_groups:
                pg["lr"] = cur
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
        losses.append(running / steps_per_epoch)
    head.eval()
    with torch.no_grad():
        scores = head(test_x)
    return {**topk_accuracy(scores, test_y), "train_loss": [round(x, 4) for x in losses], "epochs": epochs,
            "batch": batch, "lr": lr, "optimizer": optimizer}


def evaluate_linear_probe(checkpoint: str, train_data: str, test_data: str, cfg, origin: str = "") -> Dict:
    """The linear-probe top-1/top-5 (cfg.linprobe: epochs, blr, batch, optimizer, warm-up; seed cfg.train.seed)
    of the backbone in `checkpoint` (any layout `load_backbone` reads), its inputs as `eval_config` resolves."""
    from .knn import backbone_features

    lp = cfg.linprobe
    (xtr, ytr), (xte, yte), n_classes, info = backbone_features(checkpoint, train_data, test_data, cfg, lp.batch)
    res = train_linear_probe(xtr, ytr, xte, yte, n_classes, lp.epochs, lp.batch, lp.blr, lp.optimizer,
                             warmup_epochs=lp.warmup_epochs, seed=cfg.train.seed)
    return {**res, **info, "config": origin}
