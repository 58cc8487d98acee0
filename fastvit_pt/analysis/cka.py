"""Layer-to-layer similarity of two encoders: minibatch linear CKA (Nguyen, Raghu & Kornblith 2021) with the
unbiased HSIC estimator of Song et al. 2012, as mae-lite's rep_cmp_analyzer computes it.

Representation i (0..depth) of an encoder is what mae-lite's RepCatcher reads: the tokens after i blocks through
a LayerNorm (block i's norm1; after the last block the final norm), patch tokens only (CLS dropped), flattened per
image to [n, L * D]. Per minibatch, HSIC(K, L) is accumulated for every layer pair from the images' Gram
matrices; CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) * mean HSIC(L, L)). Two encoders may differ in width,
depth and patch size: only the images must be the same.
"""
from __future__ import annotations

from typing import List, Sequence

import torch


def gram(x: torch.Tensor) -> torch.Tensor:
    """x: [n, ...] -> the linear kernel X X^T [n, n] in float64 (features flattened)."""
    x = x.reshape(x.shape[0], -1).double()
    return x @ x.T


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012, eq. 5 (Nguyen et al. 2021, eq. 3), for stacks of Gram matrices: K [a, n, n], L [b, n, n]
    -> [a, b]. The diagonals are zeroed here. Needs n >= 4."""
    n = K.shape[-1]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 images per minibatch, got {n}")
    K = K * (1 - torch.eye(n, dtype=K.dtype, device=K.device))
    L = L * (1 - torch.eye(n, dtype=L.dtype, device=L.device))
    trace = torch.einsum("aij,bij->ab", K, L)  # tr(K L) for symmetric L
    k1, l1 = K.sum(-1), L.sum(-1)  # K 1, L 1: [a, n], [b, n]
    sums = k1.sum(-1)[:, None] * l1.sum(-1)[None, :]  # (1^T K 1)(1^T L 1)
    cross = k1 @ l1.T  # 1^T K L 1
    return (trace + sums / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates HSIC over minibatches for every pair of layers of two models: update() per batch, value() at
    the end ([layers_a, layers_b])."""

    def __init__(self, layers_a: int, layers_b: int):
        self.kl = torch.zeros(layers_a, layers_b, dtype=torch.float64)
        self.kk = torch.zeros(layers_a, dtype=torch.float64)
        self.ll = torch.zeros(layers_b, dtype=torch.float64)
        self.batches = 0

    def update(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> None:
        """feats_*: one [n, ...] tensor per layer, the same n images in the same order on both sides."""
        if len(feats_a) != self.kl.shape[0] or len(feats_b) != self.kl.shape[1]:
            raise ValueError(f"expected {tuple(self.kl.shape)} layers, got {len(feats_a)} and {len(feats_b)}")
        K = torch.stack([gram(f) for f in feats_a]).cpu()
        L = torch.stack([gram(f) for f in feats_b]).cpu()
        if K.shape[-1] != L.shape[-1]:
            raise ValueError(f"the two sides hold {K.shape[-1]} and {L.shape[-1]} images: CKA needs the same images")
        self.kl += hsic_unbiased(K, L)
        self.kk += torch.diagonal(hsic_unbiased(K, K))
        self.ll += torch.diagonal(hsic_unbiased(L, L))
        self.batches += 1

    def value(self) -> torch.Tensor:
        if not self.batches:
            raise ValueError("CKA: no minibatch was added")
        return self.kl / (self.kk[:, None].sqrt() * self.ll[None, :].sqrt())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased linear CKA of two representations of the same n images (one minibatch): x [n, ...], y [n, ...]."""
    acc = MinibatchCKA(1, 1)
    acc.update([x], [y])
    return acc.value().item()


@torch.no_grad()
def layer_representations(encoder, images: torch.Tensor) -> List[torch.Tensor]:
    """encoder: a VisionTransformer; images [n, C, H, W] -> depth + 1 tensors [n, L, D]: the patch tokens after
    0..depth blocks, each through its LayerNorm (`hidden_norm`), as mae-lite's RepCatcher reads them."""
    hidden = {i: None for i in range(encoder.depth + 1)}
    encoder.forward_tokens(encoder.prepend_cls(encoder.embed_patches(images)), hidden_out=hidden)
    return [encoder.hidden_norm(i)(hidden[i])[:, 1:] for i in range(encoder.depth + 1)]
