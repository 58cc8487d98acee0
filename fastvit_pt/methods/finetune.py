"""Supervised fine-tuning of a pre-trained backbone (mae-lite's improved recipe, or MAE's): a classifier ViT
whose backbone comes from `method.init`, with a fresh head, timm's Mixup / CutMix and RandomErasing on the
device, and layer-wise lr decay groups for the engine's optimizer."""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.optim import layer_decay_groups
from ..models import VisionTransformer, create_model
from .base import Method
from .configs import FinetuneConfig


class Finetune(Method):
    """classifies (FinetuneConfig.classifies): the loop may score encoder()(images) -> logits on eval.path."""

    def __init__(self, model: VisionTransformer, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
                 smoothing: float = 0.0, reprob: float = 0.0, layer_decay: float = 1.0,
                 section: Optional[FinetuneConfig] = None):
        super().__init__(section or FinetuneConfig(mixup=mixup, cutmix=cutmix, smoothing=smoothing, reprob=reprob,
                                                   layer_decay=layer_decay))
        if not isinstance(model, VisionTransformer) or model.num_classes != num_classes:
            raise ValueError(f"method 'finetune' needs a classifier ViT with {num_classes} outputs (vit_*), "
                             f"got {type(model).__name__}")
        self.model, self.num_classes, self.layer_decay = model, num_classes, layer_decay
        self.smoothing = smoothing
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                                  num_classes=num_classes)
        self.reprob = reprob

    def augment(self, images: torch.Tensor, labels: torch.Tensor):
        """Random erasing, then mixup / cutmix, on the device: (images, soft targets [N, K] or hard labels [N])."""
        if self.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            images = RandomErasing(self.reprob, mode="pixel", device=images.device)(images)
        if self.mixup_fn is not None:
            if len(images) % 2:
                raise ValueError(f"mixup/cutmix pair samples within a batch: train.micro_batch must be even, got {len(images)}")
            images, labels = self.mixup_fn(images, labels)
        return images, labels

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images, target = (self.augment(batch.images, batch.labels) if self.training else (batch.images, batch.labels))
        logits = self.model(images).float()
        # soft targets [N, K] from mixup already carry the label smoothing; hard labels get it here
        smoothing = 0.0 if target.ndim == 2 else self.smoothing
        return {"loss": F.cross_entropy(logits, target, label_smoothing=smoothing)}

    def encoder(self) -> nn.Module:
        """What is exported and evaluated: the whole classifier (timm keys, head included)."""
        return self.model

    def describe(self):
        return [f"init {self.section.init}"]

    def param_groups(self, weight_decay: float) -> List[Dict]:
        """Layer-wise lr decay groups; no weight decay on biases, norms, pos_embed and cls_token."""
        return layer_decay_groups(self.model, weight_decay, self.layer_decay, self.model.depth)


def _warn_on_other_statistics(data, init: str) -> None:
    """A backbone fine-tuned on inputs normalised unlike its pre-training starts from features of other inputs."""
    from ..engine.backbone import run_config

    pre = run_config(init)
    if pre is not None and (tuple(pre.data.mean), tuple(pre.data.std)) != (tuple(data.mean), tuple(data.std)):
        print(f"warning: {init} was pre-trained on images normalised with mean {list(pre.data.mean)} std "
              f"{list(pre.data.std)}, and this recipe normalises with mean {list(data.mean)} std "
              f"{list(data.std)}; set data.mean / data.std to the pre-training's unless this is deliberate",
              file=sys.stderr)


def build(section: FinetuneConfig, m, plan) -> Finetune:
    f = section
    if not f.init:
        from ..config import ConfigError

        raise ConfigError("method.init is required: the pre-training checkpoint to start from "
                          "(init=runs/mae_tiny_400ep, or a checkpoint file), or init=scratch for random initialisation")
    name = m.name.removeprefix("mae_")  # a pre-training recipe's model name names the same encoder
    model = create_model(name, img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
                         num_classes=plan.num_classes, global_pool=f.global_pool, drop_path_rate=m.drop_path,
                         attn_impl=plan.attn_impl)
    if f.init != "scratch":
        from ..engine.backbone import load_backbone

        report = load_backbone(model, f.init)
        if plan.env.is_main:
            print(f"method.init: {report}", file=sys.stderr)
            _warn_on_other_statistics(plan.data, f.init)
    # MAE's head init: tiny weights, so the pre-trained features are not disturbed by a random projection
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return Finetune(model, plan.num_classes, f.mixup, f.cutmix, f.smoothing, f.reprob, f.layer_decay, section=f)
