"""Per-layer, per-head attention statistics, the paper's attention analysis (mae-lite's attn_analyzer):
the mean attention distance (the attention-weighted distance between a query patch's centre and each key
patch's centre, in pixels) and the attention entropy (nats), both averaged over query patches and images.

CLS is excluded as mae-lite excludes it: the patch-to-patch block of the pre-softmax logits is renormalised
by its own softmax (`patch_attention`). Two differences from mae-lite, both deliberate: distances are in pixels
(patch offsets times the patch size; mae-lite multiplies by 14, the 224-px grid's side, whatever the patch), and
the entropy is exact (p log p = 0 at p = 0; mae-lite adds 1e-6 inside the log).
"""
from __future__ import annotations

from typing import Dict

import torch


def patch_distances(grid: int, patch_size: int) -> torch.Tensor:
    """[L, L] Euclidean distances in pixels between the centres of the patches of a grid x grid layout (row-major,
    the order patch_embed flattens them in)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def patch_attention(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, H, 1 + L, 1 + L] (CLS first) -> attention among patches only [B, H, L, L], rows summing to 1."""
    return logits[:, :, 1:, 1:].double().softmax(dim=-1)


def attention_distance(attn: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """attn [B, H, L, L] (rows sum to 1), dist [L, L] -> the mean over queries of sum_k a_qk d_qk: [B, H]."""
    return (attn * dist.to(attn)).sum(-1).mean(-1)


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """attn [B, H, L, L] -> the mean over queries of -sum_k a_qk log a_qk: [B, H] (log L for uniform, 0 one-hot)."""
    return -torch.special.xlogy(attn, attn).sum(-1).mean(-1)


class AttentionStats:
    """Sums of per-image distance and entropy for every layer and head of one encoder; update() per batch."""

    def __init__(self, depth: int, heads: int, grid: int, patch_size: int):
        self.dist = patch_distances(grid, patch_size)
        self.distance = torch.zeros(depth, heads, dtype=torch.float64)
        self.entropy = torch.zeros(depth, heads, dtype=torch.float64)
        self.images = 0

    def update(self, logits: Dict[int, torch.Tensor]) -> None:
        """logits: block index -> [B, H, 1 + L, 1 + L] pre-softmax attention, every block present."""
        for i, lg in logits.items():
            a = patch_attention(lg.cpu())
            self.distance[i] += attention_distance(a, self.dist).sum(0)
            self.entropy[i] += attention_entropy(a).sum(0)
        self.images += next(iter(logits.values())).shape[0]

    def result(self) -> Dict[str, list]:
        """{"distance_px": [depth][heads], "entropy": [depth][heads]}, averaged over the images."""
        if not self.images:
            raise ValueError("attention statistics: no image was added")
        return {"distance_px": (self.distance / self.images).tolist(), "entropy": (self.entropy / self.images).tolist()}


@torch.no_grad()
def encoder_attention(encoder, images: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Every block's pre-softmax attention logits [n, H, 1 + L, 1 + L] for images [n, C, H, W]."""
    _, logits = encoder.forward_features(images, attn_layers=range(encoder.depth))
    return logits
