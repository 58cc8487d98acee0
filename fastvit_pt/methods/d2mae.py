"""D2-MAE (mae-lite): D-MAE with the two targets decoupled in depth. The student has a 13th block that keeps
only norm1 + qkv: its attention logits, read on top of block 12, are distilled from the teacher's last layer,
while the MAE decoder reconstructs from block 8's output (`method.decoder_block`). Downstream keeps blocks
1-12 (the exported encoder); the 13th block and the decoder are pre-training only."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from ..models import MaskedAutoencoderViT, VisionTransformer
from .configs import D2MAEConfig
from .dmae import DMAE, build_teacher, hidden_representations
from .mae import build_mae_model


class LogitsBlock(nn.Module):
    """A block cut down to what attention logits need: norm1 and qkv (q.k^T/sqrt(d); v, proj, MLP dropped)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qk = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k = self.qk(self.norm1(x)).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return (q * self.head_dim**-0.5) @ k.transpose(-2, -1)


class D2MAE(DMAE):
    def __init__(self, model: MaskedAutoencoderViT, teacher: VisionTransformer, mask_ratio: float,
                 decoder_block: int = 8, attn_weight: float = 1.0, hidden_layers=(), hidden_weight: float = 1.0,
                 section: Optional[D2MAEConfig] = None):
        super().__init__(model, teacher, mask_ratio, attn_weight, hidden_layers, hidden_weight,
                         section or D2MAEConfig(mask_ratio=mask_ratio, decoder_block=decoder_block))
        enc = model.encoder
        if not 1 <= decoder_block <= enc.depth:
            raise ValueError(f"method.decoder_block must be in 1..{enc.depth} (1-based), got {decoder_block}")
        self.decoder_block = decoder_block
        self.logits_block = LogitsBlock(enc.embed_dim, enc.num_heads)  # the 13th block
        self.decoder_input_norm = nn.LayerNorm(enc.embed_dim, eps=1e-6)  # block 8's output, normalised for the decoder
        if enc.depth not in self.hidden_layers:  # else the final norm reads the distilled representation
            enc.norm.requires_grad_(False)  # the encoder's final norm is on no loss path here (and unused by DDP)

    def student_forward(self, imgs: torch.Tensor, ids_shuffle: Optional[torch.Tensor]):
        enc = self.model.encoder
        k, depth = self.decoder_block, enc.depth
        # the encoder's own pass, reading the tokens after block k for the decoder and after block 12 (before the
        # frozen final norm) for the logits block
        hidden: Dict[int, torch.Tensor] = {i: None for i in (*self.hidden_layers, k, depth)}
        out = self.model.forward_encoder(imgs, self.mask_ratio, ids_shuffle, hidden_out=hidden)
        pred = self.model.forward_decoder(self.decoder_input_norm(hidden[k]), out.ids_restore)
        loss = self.model.forward_loss(imgs, pred, out.mask)
        reps = hidden_representations(enc, {i: hidden[i] for i in self.hidden_layers})
        return loss, self.logits_block(hidden[depth]), reps, out.ids_shuffle


def build(section: D2MAEConfig, model, plan) -> D2MAE:
    s = section
    return D2MAE(build_mae_model(s, model, plan.attn_impl), build_teacher(s, model, plan.attn_impl, plan.env.is_main),
                 s.mask_ratio, s.decoder_block, s.attn_weight, s.hidden_layers, s.hidden_weight, section=s)
