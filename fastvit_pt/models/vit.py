"""Plain ViT whose state-dict keys match timm's VisionTransformer (cls_token, pos_embed, patch_embed.proj,
blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, fc_norm, head).

Architecture only: no data, no distributed code. Attention runs through scaled_dot_product_attention
unless a block's pre-softmax logits are asked for (distillation, analysis) or attn_impl="math".
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_IMPLS = ("sdpa", "math")


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding as in MAE: [1 + grid*grid, dim] (row 0, the cls slot, is zeros)."""
    assert dim % 4 == 0, "sin-cos position embedding needs dim divisible by 4"
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    # MAE's convention: the first half of the channels encodes w (the fast axis), the second half h
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def enc(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # [M, D/4]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([enc(gh), enc(gw)], axis=1)  # [grid*grid, dim]
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


class DropPath(nn.Module):
    """Stochastic depth per sample (no parameters)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> [N, L, D], L = (H / p) (W / p): any size that is a multiple of the patch (DINO's
        96-px local crops on a 224-px model); the position embedding follows (`VisionTransformer.embed_patches`)."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input is {h}x{w} px, not a multiple of the model's {self.patch_size}-px patches")
        return self.proj(x).flatten(2).transpose(1, 2)


def relative_position_index(grid: Tuple[int, int]) -> torch.Tensor:
    """BEiT's index into a relative-position table for 1 + Wh*Ww tokens: [T, T] int64. Patch pairs index
    their (dy, dx) offset; the last three entries are cls->patch, patch->cls and cls->cls."""
    wh, ww = grid
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # [2, L]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [L, L, 2]
    table = (2 * wh - 1) * (2 * ww - 1)
    index = torch.zeros(wh * ww + 1, wh * ww + 1, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1
    index[0, 1:], index[1:, 0], index[0, 0] = table, table + 1, table + 2
    return index


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "sdpa",
                 rel_pos_grid: Optional[Tuple[int, int]] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table: Optional[nn.Parameter] = None
        if rel_pos_grid is not None:  # per-layer relative position bias (BEiT's names, zero-initialised: a
            # model fine-tuned from a checkpoint without it starts as that checkpoint)
            wh, ww = rel_pos_grid
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1) + 3, num_heads))
            self.register_buffer("relative_position_index", relative_position_index(rel_pos_grid), persistent=False)

    def _rel_pos_bias(self, n: int) -> Optional[torch.Tensor]:
        """[H, N, N] additive bias, or None without relative positions."""
        if self.relative_position_bias_table is None:
            return None
        if n != self.relative_position_index.shape[0]:
            raise ValueError(f"relative position bias is defined for all {self.relative_position_index.shape[0]} tokens, "
                             f"got {n}: RPE models are for fine-tuning on whole images, not masked pre-training")
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)

    def _qkv(self, x: torch.Tensor):
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _logits(self, q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        logits = (q * self.scale) @ k.transpose(-2, -1)
        return logits if bias is None else logits + bias

    def attn_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Only the pre-softmax q.k^T/sqrt(d) [B, H, N, N]: what a distillation target needs, without the
        softmax, the value product or the projection."""
        q, k, _ = self._qkv(x)
        return self._logits(q, k, self._rel_pos_bias(x.shape[1]))

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        """x: [B, N, C] -> [B, N, C]; with return_logits also the pre-softmax q.k^T/sqrt(d): [B, H, N, N]."""
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        bias = self._rel_pos_bias(N)
        if return_logits or self.attn_impl == "math":
            logits = self._logits(q, k, bias)
            out = logits.softmax(dim=-1) @ v
        else:
            logits = None
            mask = None if bias is None else bias.unsqueeze(0).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, logits) if return_logits else out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_impl: str = "sdpa",
        rel_pos_grid: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl, rel_pos_grid=rel_pos_grid)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        """x: [B, N, C] -> [B, N, C] (and [B, H, N, N] attention logits when asked)."""
        if return_logits:
            a, logits = self.attn(self.norm1(x), return_logits=True)
        else:
            a, logits = self.attn(self.norm1(x)), None
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, logits) if return_logits else x


class VisionTransformer(nn.Module):
    """ViT with a class token. global_pool "token" reads the cls token; "avg" averages patch tokens and,
    by default (fc_norm=None), moves the final LayerNorm after pooling (mae-lite's / timm's fc_norm)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        fc_norm: Optional[bool] = None,
        drop_path_rate: float = 0.0,
        pos_embed: str = "learn",
        norm_eps: float = 1e-6,
        attn_impl: str = "sdpa",
        rel_pos_bias: bool = False,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if pos_embed not in ("learn", "sincos"):
            raise ValueError(f"pos_embed must be 'learn' or 'sincos', got {pos_embed!r}")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        L = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + L, embed_dim), requires_grad=pos_embed == "learn")
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_eps, attn_impl=attn_impl,
                      rel_pos_grid=(self.patch_embed.grid_size,) * 2 if rel_pos_bias else None)
                for i in range(depth)
            ]
        )
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(pos_embed)

    def _init_weights(self, pos_embed: str) -> None:
        # MAE's initialisation (xavier on every Linear and on the flattened patch projection)
        if pos_embed == "sincos":
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size).unsqueeze(0))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> patch tokens with position added, no cls: [N, L, D]. At another size than the
        model's, the patch grid's position embedding is resampled to the input's grid."""
        grid = (x.shape[-2] // self.patch_embed.patch_size, x.shape[-1] // self.patch_embed.patch_size)
        return self.patch_embed(x) + self.patch_pos_embed(grid)

    def patch_pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The patch tokens' position embedding for a (rows, cols) grid: [1, rows * cols, D]. The model's own grid
        returns it as it is; another is resampled as timm's resample_abs_pos_embed does (bicubic, antialiased,
        in fp32; DINO's interpolate_pos_encoding differs by its +0.1 scale offset, not kept)."""
        pos = self.pos_embed[:, 1:, :]
        g = self.patch_embed.grid_size
        if grid == (g, g):
            return pos
        pos = pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=grid, mode="bicubic", antialias=True, align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(self.pos_embed.dtype)

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L', D] -> [N, 1 + L', D]"""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_tokens(
        self, x: torch.Tensor, attn_layers: Iterable[int] = (), max_depth: Optional[int] = None,
        hidden_out: Optional[Dict[int, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """Run the blocks (and the final norm, when all of them run) over a prepared token sequence.

        x: [N, T, D]. attn_layers: block indices (negative counts from the end) whose pre-softmax attention
        logits [N, H, T, T] are returned. max_depth stops after that many blocks (no final norm), so a frozen
        teacher pays only for the layers it is read at. hidden_out: a dict whose keys count blocks (0..depth, as
        mae-lite's RepCatcher); key i is filled with the tokens after i blocks [N, T, D], before any norm
        (`hidden_norm(i)` is the LayerNorm mae-lite reads them through).
        """
        depth = self.depth if max_depth is None else max_depth
        want = {i % self.depth for i in attn_layers}
        logits: Dict[int, torch.Tensor] = {}
        if hidden_out is not None and 0 in hidden_out:
            hidden_out[0] = x
        for i in range(depth):
            if i in want:
                x, logits[i] = self.blocks[i](x, return_logits=True)
            else:
                x = self.blocks[i](x)
            if hidden_out is not None and i + 1 in hidden_out:
                hidden_out[i + 1] = x
        if depth == self.depth:
            x = self.norm(x)
        return x, logits

    def hidden_norm(self, i: int) -> nn.Module:
        """The LayerNorm through which the representation after i blocks is read (mae-lite's RepCatcher: the
        next block's norm1, or after the last block the final norm, fc_norm where it moved after pooling)."""
        if not 0 <= i <= self.depth:
            raise ValueError(f"representation {i} is not one of 0..{self.depth} (blocks run)")
        if i < self.depth:
            return self.blocks[i].norm1
        return self.fc_norm if isinstance(self.norm, nn.Identity) else self.norm

    def forward_features(self, x: torch.Tensor, attn_layers: Iterable[int] = ()):
        """x: [N, C, H, W] -> tokens [N, 1 + L, D] (and the requested attention logits when attn_layers)."""
        tokens, logits = self.forward_tokens(self.prepend_cls(self.embed_patches(x)), attn_layers)
        return (tokens, logits) if attn_layers else tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: [N, 1 + L, D] -> [N, num_classes] (or the pooled [N, D] features with pre_logits)."""
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
