"""Masked autoencoder (He et al. 2022) around our timm-compatible ViT encoder.

forward = forward_encoder -> forward_decoder -> forward_loss. The encoder is a VisionTransformer kept
under `self.encoder`, so `mae.encoder.state_dict()` loads into timm's VisionTransformer as it is.
"""
from __future__ import annotations

from typing import Dict, Iterable, NamedTuple, Optional

import torch
import torch.nn as nn

from .vit import Block, VisionTransformer, init_linear_and_norm, sincos_pos_embed_2d


class EncoderOutput(NamedTuple):
    latent: torch.Tensor  # [N, 1 + K, D] cls + visible tokens, normalised
    mask: torch.Tensor  # [N, L] 0 = visible, 1 = masked, in the original patch order
    ids_restore: torch.Tensor  # [N, L] argsort(ids_shuffle)
    ids_shuffle: torch.Tensor  # [N, L] the first K are the visible patches
    attn_logits: Dict[int, torch.Tensor]  # block index -> [N, H, 1 + K, 1 + K]


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """int(L * (1 - r)): the count of patches the encoder sees, truncated as facebookresearch/mae's and mae-lite's
    random_masking keep it (`len_keep = int(L * (1 - mask_ratio))`): 19 of 196 at r = 0.9, 14 of 49 at r = 0.7."""
    return int(num_patches * (1.0 - mask_ratio))


_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for h < 2**32 held in int64, in 16-bit halves so no product overflows int64."""
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def keyed_shuffle(keys: torch.Tensor, n: int) -> torch.Tensor:
    """A random permutation of 0..n-1 per sample, a pure function of its 63-bit key: keys [N] int64 -> [N, n].

    A counter-based draw (hash of key and position) instead of the global RNG, so a sample is masked the
    same way on any rank count, micro-batch split or device: the basis of the 2-rank == 1-rank guarantee.
    Elementwise int64 ops on [N, n]: no host sync, no per-sample generator.
    """
    lo, hi = keys & _M32, (keys >> 32) & _M32
    pos = torch.arange(n, device=keys.device, dtype=torch.int64)
    h = _fmix32(_fmix32(lo ^ 0x9E3779B9)[:, None] ^ _fmix32(pos * 0x2545 + 0x6A09E667)[None, :])
    h = _fmix32(h ^ _fmix32(hi ^ 0x3C6EF372)[:, None])
    return torch.argsort(h, dim=1, stable=True)


def random_masking(x: torch.Tensor, mask_ratio: float, ids_shuffle: Optional[torch.Tensor] = None):
    """Keep a random subset of int(L * (1 - r)) tokens per sample (`num_visible`).

    x: [N, L, D]. ids_shuffle: [N, L] to reuse another model's permutation (a distillation teacher must see
    the student's visible patches); drawn from the global RNG when None.
    Returns x_visible [N, K, D], mask [N, L] (1 = masked), ids_restore [N, L], ids_shuffle [N, L].
    """
    N, L, D = x.shape
    keep = num_visible(L, mask_ratio)
    if ids_shuffle is None:
        ids_shuffle = torch.argsort(torch.rand(N, L, device=x.device), dim=1)
    elif ids_shuffle.shape != (N, L):
        raise ValueError(f"ids_shuffle has shape {tuple(ids_shuffle.shape)}, expected {(N, L)}")
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore, ids_shuffle


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: [N, C, H, W] -> [N, L, p*p*C] (MAE's order: row of patches, then pixel row, pixel column, channel)."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, C: int) -> torch.Tensor:
    """x: [N, L, p*p*C] -> [N, C, H, W]"""
    N, L, _ = x.shape
    h = w = int(L**0.5)
    x = x.reshape(N, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(N, C, h * p, w * p)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error over masked patches only.

    pred, target: [N, L, P]; mask: [N, L] with 1 on masked patches. norm_pix normalises each target patch by
    its own mean and variance (var + 1e-6), MAE's stronger target. Computed in fp32 whatever the autocast.
    """
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 96,
        decoder_depth: int = 1,
        decoder_num_heads: int = 3,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        attn_impl: str = "sdpa",
    ):
        super().__init__()
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss
        self.encoder = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            pos_embed="sincos",
            attn_impl=attn_impl,
        )
        grid = self.encoder.patch_embed.grid_size
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_embed_dim, grid).unsqueeze(0), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attn_impl=attn_impl) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_linear_and_norm)

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.in_chans)

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        ids_shuffle: Optional[torch.Tensor] = None,
        attn_layers: Iterable[int] = (),
        max_depth: Optional[int] = None,
        hidden_out: Optional[Dict[int, torch.Tensor]] = None,
    ) -> EncoderOutput:
        """imgs: [N, C, H, W] -> EncoderOutput (latent [N, 1 + K, D], K = num_visible(L, r)); see
        VisionTransformer.forward_tokens for attn_layers, max_depth and hidden_out."""
        size = self.encoder.patch_embed.img_size
        if imgs.shape[-2:] != (size, size):  # the decoder's position embedding is fixed to the model's grid
            raise ValueError(f"input is {imgs.shape[-2]}x{imgs.shape[-1]} px but this MAE reconstructs {size}x{size}")
        x = self.encoder.embed_patches(imgs)
        x, mask, ids_restore, ids_shuffle = random_masking(x, mask_ratio, ids_shuffle)
        x, logits = self.encoder.forward_tokens(self.encoder.prepend_cls(x), attn_layers, max_depth, hidden_out)
        return EncoderOutput(x, mask, ids_restore, ids_shuffle, logits)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: [N, 1 + K, D], ids_restore: [N, L] -> per-patch pixel predictions [N, L, p*p*C]."""
        x = self.decoder_embed(latent)
        N, L = ids_restore.shape
        masked = self.mask_token.expand(N, L + 1 - x.shape[1], -1).to(x.dtype)
        patches = torch.cat([x[:, 1:, :], masked], dim=1)  # visible first, in ids_shuffle order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mae_loss(pred, self.patchify(imgs), mask, self.norm_pix_loss)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, ids_shuffle: Optional[torch.Tensor] = None):
        """imgs: [N, C, H, W] -> (loss [], pred [N, L, p*p*C], mask [N, L])"""
        enc = self.forward_encoder(imgs, mask_ratio, ids_shuffle)
        pred = self.forward_decoder(enc.latent, enc.ids_restore)
        return self.forward_loss(imgs, pred, enc.mask), pred, enc.mask
