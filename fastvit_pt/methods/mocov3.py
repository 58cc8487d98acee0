"""MoCo-v3 for ViTs (facebookresearch/moco-v3, moco/builder.py MoCo_ViT and main_moco.py): two views, a base
encoder with a 3-layer projector and a 2-layer predictor, a momentum encoder (an EMA of encoder + projector),
and a symmetric InfoNCE loss against the momentum encoder's keys gathered from every rank.

Where this differs from the reference, and why:
- The momentum update runs in `after_step`, after optimizer step t with momentum m(t); moco-v3 runs it at the
  start of iteration t's forward with the same m(t) and the same parameters: the same sequence of updates.
- The logits and the loss are computed in fp32 (moco-v3: in the AMP dtype); 16-bit logits at T = 0.2 lose
  precision for nothing (it is a [N, world N] matrix).
- BatchNorm in the projector and predictor synchronises its statistics over the ranks with autograd-aware
  all-reduces (moco-v3 converts to SyncBatchNorm, which torch runs on GPUs only): the CPU (gloo) path gets the
  same statistics as one rank holding the whole batch.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import VisionTransformer, create_model
from .base import Method, ema_update_, gather_across_ranks, held_compute, rank, world_size
from .configs import MoCoV3Config


class RankSyncedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics cover every rank's batch (SyncBatchNorm's maths, on any backend, with
    autograd through the all-reduce). Computed in fp32 whatever the module's dtype (the parameters and buffers in
    bf16 where DeepSpeed cast the module, inputs in bf16 under autocast, where CPU batch_norm refuses mixed
    dtypes), returned in the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        w = self.weight.float() if self.affine else None
        b = self.bias.float() if self.affine else None
        if not self.training:
            return F.batch_norm(xf, self.running_mean.float(), self.running_var.float(), w, b, False, 0.0,
                                self.eps).to(x.dtype)
        n = torch.tensor([float(x.shape[0])], device=x.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), n])
        if world_size() > 1:
            from torch.distributed.nn.functional import all_reduce

            stats = all_reduce(stats)  # one collective, with a backward
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        with torch.no_grad():  # running statistics as nn.BatchNorm1d keeps them (unbiased variance)
            m = self.momentum
            rm, rv = self.running_mean, self.running_var
            rm.mul_(1 - m).add_(mean.detach().to(rm.dtype), alpha=m)
            rv.mul_(1 - m).add_((var.detach() * count / (count - 1).clamp_min(1)).to(rv.dtype), alpha=m)
            self.num_batches_tracked.add_(1)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * w + b
        return y.to(x.dtype)


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """moco-v3's _build_mlp: Linear (no bias) + BN + ReLU between layers; BN without affine after the last when
    last_bn (the projector), nothing after it otherwise (the predictor)."""
    layers: List[nn.Module] = []
    for i in range(num_layers):
        d_in = input_dim if i == 0 else mlp_dim
        d_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [RankSyncedBatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(RankSyncedBatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class KeyEncoder(nn.Module):
    """The momentum encoder: an EMA of the base encoder and its projector (moco-v3's momentum_encoder)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def mocov3_init_(vit: VisionTransformer) -> None:
    """moco-v3 vits.py VisionTransformerMoCo's initialisation: q, k and v each Xavier-uniform as separate
    matrices, the patch projection Xavier-uniform over its fan-in 3 x p x p, the cls token N(0, 1e-6)."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear) and name.endswith("qkv"):
            bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
            nn.init.uniform_(m.weight, -bound, bound)
    proj = vit.patch_embed.proj
    fan_in = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3]  # moco-v3: 3 x p x p (RGB)
    bound = math.sqrt(6.0 / float(fan_in + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)


class MoCoV3(Method):
    def __init__(self, encoder: VisionTransformer, section: MoCoV3Config):
        super().__init__(section)
        if not isinstance(encoder, VisionTransformer) or encoder.num_classes != 0:
            raise ValueError(f"method 'mocov3' needs a ViT encoder without a head, got {type(encoder).__name__}")
        s = section
        self.temperature = s.temperature
        self.base_encoder = encoder
        self.projector = build_mlp(s.proj_layers, encoder.embed_dim, s.mlp_dim, s.dim)
        self.predictor = build_mlp(s.pred_layers, s.dim, s.mlp_dim, s.dim, last_bn=False)
        if s.stop_grad_patch_embed:  # moco-v3's --stop-grad-conv1: a fixed random patch projection
            self.base_encoder.patch_embed.requires_grad_(False)
        # held, not assigned: an nn.Module attribute would join the module tree (wrapped, cast, optimised)
        self.hold("key_encoder", KeyEncoder(copy.deepcopy(self.base_encoder), copy.deepcopy(self.projector)), saved=True)
        self.momentum = s.momentum

    @property
    def key_encoder(self) -> KeyEncoder:
        return self.held()["key_encoder"]

    def _pairs(self):
        """(EMA parameter, online parameter) pairs, in the key encoder's order."""
        online = list(self.base_encoder.parameters()) + list(self.projector.parameters())
        return list(self.key_encoder.parameters()), online

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        """batch.views[0], [1]: [N, C, H, W] each -> {"loss": symmetric InfoNCE}. Each view goes through the
        encoder alone (not concatenated): BatchNorm statistics are per view, as in moco-v3."""
        views = batch.views
        if len(views) < 2:
            raise ValueError("method mocov3 needs two views per image; the loader gave one (build it with the "
                             "method's views)")
        x1, x2 = views[0], views[1]
        q1 = self.predictor(self.projector(self.base_encoder(x1)))
        q2 = self.predictor(self.projector(self.base_encoder(x2)))
        with torch.no_grad(), held_compute(x1):
            k1, k2 = self.key_encoder(x1), self.key_encoder(x2)
        loss = self.contrastive(q1, k2) + self.contrastive(q2, k1)
        return {"loss": loss}

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of queries [N, D] against every rank's keys [world N, D]; the positives are this rank's own
        rows. Scaled by 2T as in moco-v3."""
        q = F.normalize(q.float(), dim=1)
        k = gather_across_ranks(F.normalize(k.float(), dim=1))
        logits = q @ k.t() / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> Dict[str, float]:
        """The momentum for this step (moco-v3's adjust_moco_momentum, per iteration: a half-cosine from
        method.momentum to method.momentum_end), then the EMA update of the key encoder."""
        s = self.section
        m = s.momentum_end - 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps))) * (s.momentum_end - s.momentum)
        ema_update_(*self._pairs(), m)
        self.momentum = m
        return {"momentum": m}

    def encoder(self) -> nn.Module:
        return self.base_encoder

    def param_groups(self, weight_decay: float) -> List[Dict]:
        """One group, weight decay on every trainable parameter: moco-v3's main_moco.py hands model.parameters()
        to AdamW as they are (biases and norms decayed too)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay,
                 "lr_scale": 1.0}]

    def describe(self) -> List[str]:
        s = self.section
        return [f"momentum {s.momentum} -> {s.momentum_end} (cosine), temperature {s.temperature}, projector "
                f"{s.proj_layers}x{s.mlp_dim}->{s.dim}, predictor {s.pred_layers} layers"
                + (", frozen patch projection" if s.stop_grad_patch_embed else "")]


def build(section: MoCoV3Config, m, plan) -> MoCoV3:
    # a pre-training recipe's mae_* name names the same encoder; moco-v3's ViT: fixed 2-D sin-cos positions, cls token
    encoder = create_model(m.name.removeprefix("mae_"), img_size=m.img_size, patch_size=m.patch_size,
                           in_chans=m.in_chans, num_classes=0, global_pool="token", pos_embed="sincos",
                           drop_path_rate=m.drop_path, attn_impl=plan.attn_impl)
    mocov3_init_(encoder)
    return MoCoV3(encoder, section)
