"""MAE pre-training: reconstruct the masked patches of one view."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from ..models import MaskedAutoencoderViT, create_model
from ..models.mae import keyed_shuffle
from .base import Method
from .configs import MAEConfig


class MAE(Method):
    def __init__(self, model: MaskedAutoencoderViT, mask_ratio: float, section: MAEConfig = None):
        super().__init__(section or MAEConfig(mask_ratio=mask_ratio))
        if not isinstance(model, MaskedAutoencoderViT):
            raise ValueError(f"method 'mae' needs an MAE model (mae_vit_*), got {type(model).__name__}")
        self.model, self.mask_ratio = model, mask_ratio

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        """batch.images: [N, C, H, W] normalised -> {"loss": scalar}. Masks come from the batch's per-sample
        keys where it has them (the same mask for a sample on any rank count), else from the global RNG."""
        loss, _, _ = self.model(batch.images, self.mask_ratio, masks_for(batch, self.model.num_patches))
        return {"loss": loss}

    def encoder(self) -> nn.Module:
        """The backbone that downstream tasks keep (timm-compatible keys)."""
        return self.model.encoder


def build_mae_model(section: MAEConfig, m, attn_impl: str = "sdpa") -> MaskedAutoencoderViT:
    """The MAE model a pre-training recipe names (its model section and method.norm_pix_loss)."""
    return create_model(
        m.name,
        img_size=m.img_size,
        patch_size=m.patch_size,
        in_chans=m.in_chans,
        norm_pix_loss=section.norm_pix_loss,
        drop_path_rate=m.drop_path,
        attn_impl=attn_impl,
    )


def masks_for(batch, num_patches: int):
    """The per-sample patch permutation drawn from the batch's keys (None without keys: the global RNG)."""
    keys = getattr(batch, "keys", None)
    return None if keys is None else keyed_shuffle(keys, num_patches)


def build(section: MAEConfig, model, plan) -> MAE:
    return MAE(build_mae_model(section, model, plan.attn_impl), section.mask_ratio, section)
