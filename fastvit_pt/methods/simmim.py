"""SimMIM for ViTs (microsoft/SimMIM: data/data_simmim.py MaskGenerator, models/simmim.py VisionTransformerForSimMIM
and SimMIM): large blocks of patches are replaced by a learned mask token before the position embedding, the whole
token sequence runs through the encoder, a one-layer head (1x1 conv + pixel shuffle) predicts the raw pixels, and
the loss is the L1 error over the masked pixels only.

Where this differs from the reference, and why:
- Masks are drawn on the device from each sample's key (`keyed_shuffle`, as MAE's), not by numpy's global RNG in a
  loader worker: the same mask for a sample on any rank count, micro-batch split or backend. Without keys (a batch
  that has none) they come from torch's global RNG. Same count, same block structure as MaskGenerator.
- The encoder is our plain timm-compatible ViT, so every method exports the same backbone: SimMIM's ViT-B config
  uses a shared relative position bias (USE_SHARED_RPB) and no absolute positions, LayerScale (INIT_VALUES 0.1),
  BEiT's q/v-only qkv bias and BEiT's initialisation (trunc-normal 0.02, fix_init_weight); here the backbone keeps
  its learned absolute position embedding, full qkv bias, no LayerScale and MAE's initialisation.
- The mask token lives in the method, not in the encoder: the exported backbone is a plain ViT with timm's keys.
- The loss is computed in fp32 (the reference: in the AMP dtype).
- The head predicts patch_size**2 x in_chans channels (the reference hard-codes 3).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.optim import param_groups
from ..models import VisionTransformer, create_model
from ..models.mae import keyed_shuffle
from .base import Method
from .configs import SimMIMConfig


def mask_geometry(img_size: int, patch_size: int, mask_patch_size: int) -> Tuple[int, int]:
    """(cells per side, patches per cell side) of SimMIM's mask grid; a ValueError naming the keys at fault."""
    if mask_patch_size % patch_size or img_size % mask_patch_size:
        raise ValueError(f"method.mask_patch_size={mask_patch_size} must be a multiple of model.patch_size="
                         f"{patch_size} and divide model.img_size={img_size} (SimMIM masks whole blocks of patches)")
    return img_size // mask_patch_size, mask_patch_size // patch_size


def block_masks(n: int, cells_per_side: int, scale: int, mask_count: int, keys: Optional[torch.Tensor] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """SimMIM's MaskGenerator for n samples: [n, g, g] int64 over the patch grid (g = cells_per_side x scale),
    1 = masked. Each sample masks the first mask_count cells of its permutation of the cells (keyed_shuffle of its
    key, or the global RNG without keys), each cell a scale x scale block of patches."""
    cells = cells_per_side**2
    if keys is None:
        order = torch.argsort(torch.rand(n, cells, device=device), dim=1)
    else:
        order = keyed_shuffle(keys, cells)
    mask = torch.zeros(n, cells, dtype=torch.int64, device=order.device)
    mask.scatter_(1, order[:, :mask_count], 1)
    mask = mask.view(n, cells_per_side, cells_per_side)
    return mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


class SimMIM(Method):
    def __init__(self, encoder: VisionTransformer, section: SimMIMConfig):
        super().__init__(section)
        if not isinstance(encoder, VisionTransformer) or encoder.num_classes != 0:
            raise ValueError(f"method 'simmim' needs a ViT encoder without a head, got {type(encoder).__name__}")
        pe = encoder.patch_embed
        self.patch_size, self.img_size, self.in_chans = pe.patch_size, pe.img_size, pe.proj.in_channels
        self.cells_per_side, self.scale = mask_geometry(pe.img_size, pe.patch_size, section.mask_patch_size)
        self.mask_count = int(math.ceil(self.cells_per_side**2 * section.mask_ratio))  # MaskGenerator's np.ceil
        self.backbone = encoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # SimMIM's _trunc_normal_: cut at +-std
        # encoder_stride = patch size for a ViT; PyTorch's default Conv2d init, as the reference
        self.decoder = nn.Sequential(nn.Conv2d(encoder.embed_dim, self.patch_size**2 * self.in_chans, kernel_size=1),
                                     nn.PixelShuffle(self.patch_size))

    def masks(self, n: int, keys: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """[n, H/p, W/p] int64 patch masks, 1 = masked."""
        return block_masks(n, self.cells_per_side, self.scale, self.mask_count, keys, device)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        """batch.images: [N, C, H, W] normalised -> {"loss": L1 over the masked pixels}. Masks come from the batch's
        per-sample keys where it has them, else from the global RNG."""
        x = batch.images
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"method simmim: images are {tuple(x.shape[-2:])} px; its mask grid is for "
                             f"model.img_size={self.img_size}")
        mask = self.masks(x.shape[0], getattr(batch, "keys", None), x.device)
        x_rec = self.decoder(self.forward_encoder(x, mask))
        return {"loss": self.forward_loss(x, x_rec, mask)}

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W], mask: [N, h, w] (1 = masked) -> normalised patch tokens as a map [N, D, h, w].
        VisionTransformerForSimMIM.forward: the mask token replaces the patch embedding before the position
        embedding is added (so a masked token still says where it is), then cls, every block, the final norm."""
        vit = self.backbone
        t = vit.patch_embed(x)  # [N, L, D]
        w = mask.flatten(1).unsqueeze(-1).type_as(self.mask_token)  # [N, L, 1]
        t = t * (1 - w) + self.mask_token * w
        t = t + vit.patch_pos_embed(tuple(mask.shape[1:]))
        t, _ = vit.forward_tokens(vit.prepend_cls(t))
        t = t[:, 1:]
        n, _, d = t.shape
        return t.transpose(1, 2).reshape(n, d, *mask.shape[1:])

    def forward_loss(self, x: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x, x_rec: [N, C, H, W]; mask: [N, h, w] -> mean L1 per masked pixel and channel, in fp32 (SimMIM's
        loss: the mask upsampled to pixels, sum over masked pixels / (their count + 1e-5) / in_chans)."""
        p = self.patch_size
        m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()  # [N, 1, H, W]
        l1 = F.l1_loss(x.float(), x_rec.float(), reduction="none")
        return (l1 * m).sum() / (m.sum() + 1e-5) / self.in_chans

    def encoder(self) -> nn.Module:
        return self.backbone

    def param_groups(self, weight_decay: float) -> List[Dict]:
        """No decay on biases, 1-D parameters and SimMIM's ViT no_weight_decay list (pos_embed, cls_token); the 3-D
        mask token is decayed, as there (only SimMIM's Swin adds it to the list)."""
        return param_groups(self, weight_decay, skip=("pos_embed", "cls_token"))

    def describe(self) -> List[str]:
        s = self.section
        return [f"mask {self.mask_count} of {self.cells_per_side ** 2} cells of {s.mask_patch_size} px ({self.scale}x"
                f"{self.scale} patches) per image (ratio {s.mask_ratio}); 1-layer pixel head, L1 on masked pixels"]


def build(section: SimMIMConfig, m, plan) -> SimMIM:
    # a pre-training recipe's mae_* name names the same encoder; token pooling, as MAE's exported encoder (the final
    # norm, which SimMIM trains, is kept; fastvit knn reads the cls token after it)
    mask_geometry(m.img_size, m.patch_size, section.mask_patch_size)  # before building: the error names the keys
    encoder = create_model(m.name.removeprefix("mae_"), img_size=m.img_size, patch_size=m.patch_size,
                           in_chans=m.in_chans, num_classes=0, global_pool="token", drop_path_rate=m.drop_path,
                           attn_impl=plan.attn_impl)
    return SimMIM(encoder, section)
