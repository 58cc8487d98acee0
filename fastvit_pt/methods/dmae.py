"""D-MAE (mae-lite): MAE pre-training of a small student that also distils a frozen MAE teacher's last-layer
attention. The student's pre-softmax attention logits (q.k^T/sqrt(d)) of its last block go through a learned
1x1 head-mixing adapter (student heads -> teacher heads, no bias) and are regressed (MSE) onto the teacher's,
computed on the same visible patches. Optionally, hidden representations are distilled too (mae-lite's
`distill_hidden_idx`): index i is the representation after i blocks read through a LayerNorm (block i's norm1,
or the final norm after the last block), mapped to the teacher's width by a Linear without bias.

The teacher is frozen, in eval mode, run under no_grad in the batch's dtype, and lives outside the method's
module tree: no gradients, no optimizer state, never wrapped by DDP or DeepSpeed, never in a checkpoint (the
config names its file). It runs only what the targets need: every block before the last, then the last
block's norm1 and q.k^T (no softmax, value product, projection, MLP or final norm).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import MaskedAutoencoderViT, VisionTransformer, create_model
from ..models.mae import num_visible
from .base import Method
from .configs import DistillConfig
from .mae import build_mae_model, masks_for


class FrozenTeacher:
    """A frozen encoder, deliberately not an nn.Module attribute of the method (see the module docstring)."""

    def __init__(self, encoder: VisionTransformer):
        self.encoder = encoder.eval().requires_grad_(False)

    def _place(self, like: torch.Tensor) -> torch.dtype:
        """Once: onto the batch's device, in the compute dtype: autocast's (bf16 on GPU) when it is on, so the
        frozen weights are stored in bf16 instead of re-cast on every step, else the batch's. Returns that dtype."""
        kind = like.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else like.dtype
        p = next(self.encoder.parameters())
        if p.device != like.device or p.dtype != dtype:
            self.encoder.to(device=like.device, dtype=dtype)
        return dtype

    @torch.no_grad()
    def targets(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor, keep: int,
                hidden_layers: Sequence[int] = ()) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """Last-layer attention logits [B, H_t, 1 + keep, 1 + keep] on the visible patches ids_shuffle[:, :keep]
        (the student's), and the normalised representations `hidden_layers` (`hidden_representations`)."""
        dtype = self._place(imgs)
        t = self.encoder
        x = t.embed_patches(imgs.to(dtype))
        vis = ids_shuffle[:, :keep]
        x = t.prepend_cls(torch.gather(x, 1, vis.unsqueeze(-1).expand(-1, -1, x.shape[-1])))
        last = t.depth - 1
        hidden: Dict[int, torch.Tensor] = {i: None for i in hidden_layers}
        x, _ = t.forward_tokens(x, max_depth=last, hidden_out=hidden)
        blk = t.blocks[last]
        logits = blk.attn.attn_logits(blk.norm1(x))
        if t.depth in hidden:  # the one target past the last block's attention: run the rest of it
            hidden[t.depth] = blk(x)
        return logits, hidden_representations(t, hidden)


def hidden_representations(encoder: VisionTransformer, raw: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """{i: tokens after i blocks} -> {i: the same through `encoder.hidden_norm(i)`}: mae-lite's RepCatcher, which
    hooks block i's norm1 (or the final norm after the last block), not the residual stream itself."""
    return {i: encoder.hidden_norm(i)(x) for i, x in raw.items()}


def head_mixing_adapter(student_heads: int, teacher_heads: int) -> nn.Conv2d:
    """1x1 convolution over the head axis of [B, H_s, N, N] -> [B, H_t, N, N], no bias, as mae-lite's
    attn_adapter, with Conv2d's own initialisation as there. (Starting it as the identity for equal head counts
    was tried side by side and did not help: benchmarks/results/cpu_analysis.md.)"""
    return nn.Conv2d(student_heads, teacher_heads, kernel_size=1, bias=False)


class DMAE(Method):
    def __init__(self, model: MaskedAutoencoderViT, teacher: VisionTransformer, mask_ratio: float,
                 attn_weight: float = 1.0, hidden_layers: Sequence[int] = (), hidden_weight: float = 1.0,
                 section: Optional[DistillConfig] = None):
        super().__init__(section or DistillConfig(mask_ratio=mask_ratio))
        if not isinstance(model, MaskedAutoencoderViT):
            raise ValueError(f"distillation needs an MAE student (mae_vit_*), got {type(model).__name__}")
        enc = model.encoder
        if teacher.patch_embed.num_patches != enc.patch_embed.num_patches:
            raise ValueError(f"the teacher cuts {teacher.patch_embed.num_patches} patches and the student "
                             f"{enc.patch_embed.num_patches}: give both the same model.img_size and model.patch_size")
        bad = [i for i in hidden_layers if not (0 <= i <= min(enc.depth, teacher.depth))]
        if bad:
            raise ValueError(f"method.hidden_layers {bad}: each is a count of blocks run, 0..{min(enc.depth, teacher.depth)} "
                             f"for a {enc.depth}-block student and a {teacher.depth}-block teacher")
        self.model, self.mask_ratio = model, mask_ratio
        self.attn_weight, self.hidden_weight = attn_weight, hidden_weight
        self.hidden_layers: List[int] = sorted(set(hidden_layers))
        self.adapter = head_mixing_adapter(enc.num_heads, teacher.num_heads)
        # mae-lite's hidden_adapter: Linear without bias (the targets are LayerNorm outputs)
        self.hidden_adapters = nn.ModuleDict({str(i): nn.Linear(enc.embed_dim, teacher.embed_dim, bias=False)
                                              for i in self.hidden_layers})
        # held outside the module tree: not wrapped, not saved (the config names its file); FrozenTeacher places
        # it in the compute dtype itself
        self.teacher = FrozenTeacher(self.hold("teacher", teacher, saved=False))

    def student_forward(self, imgs: torch.Tensor, ids_shuffle: Optional[torch.Tensor]):
        """(MAE loss, student last-layer logits [B, H_s, N, N], normalised hidden representations, the
        ids_shuffle used)."""
        hidden: Dict[int, torch.Tensor] = {i: None for i in self.hidden_layers}
        enc = self.model.forward_encoder(imgs, self.mask_ratio, ids_shuffle, attn_layers=[-1], hidden_out=hidden)
        pred = self.model.forward_decoder(enc.latent, enc.ids_restore)
        loss = self.model.forward_loss(imgs, pred, enc.mask)
        return (loss, enc.attn_logits[self.model.encoder.depth - 1],
                hidden_representations(self.model.encoder, hidden), enc.ids_shuffle)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        imgs = batch.images
        loss_mae, s_logits, s_hidden, ids_shuffle = self.student_forward(imgs, masks_for(batch, self.model.num_patches))
        keep = num_visible(self.model.num_patches, self.mask_ratio)
        t_logits, t_hidden = self.teacher.targets(imgs, ids_shuffle, keep, self.hidden_layers)
        loss_attn = F.mse_loss(self.adapter(s_logits).float(), t_logits.float())
        out = {"loss_mae": loss_mae, "loss_attn": loss_attn}
        loss = loss_mae + self.attn_weight * loss_attn
        if self.hidden_layers:
            loss_hidden = sum(F.mse_loss(self.hidden_adapters[str(i)](s_hidden[i]).float(), t_hidden[i].float())
                              for i in self.hidden_layers) / len(self.hidden_layers)
            out["loss_hidden"] = loss_hidden
            loss = loss + self.hidden_weight * loss_hidden
        return {"loss": loss, **out}

    def encoder(self) -> nn.Module:
        return self.model.encoder

    def describe(self):
        return [f"teacher {self.section.teacher_model} from {self.section.teacher}"]


def build_teacher(section: DistillConfig, m, attn_impl: str = "sdpa", is_main: bool = True) -> VisionTransformer:
    """The frozen teacher encoder named by method.teacher_model, loaded from method.teacher (`random`: left as
    initialised, for benchmarks)."""
    from ..config import ConfigError
    from ..engine.backbone import load_backbone

    if not section.teacher:
        raise ConfigError(f"method.teacher is required for method {section.name!r}: the MAE teacher's checkpoint "
                          "(ours, mae-lite's or facebookresearch/mae's), e.g. method.teacher=runs/mae_base_1600ep")
    teacher = create_model(section.teacher_model.removeprefix("mae_"), img_size=m.img_size, patch_size=m.patch_size,
                           in_chans=m.in_chans, num_classes=0, attn_impl=attn_impl)
    if section.teacher != "random":
        report = load_backbone(teacher, section.teacher)
        if is_main:
            print(f"method.teacher: {report}", file=sys.stderr)
    return teacher


def build(section: DistillConfig, model, plan) -> DMAE:
    s = section
    return DMAE(build_mae_model(s, model, plan.attn_impl), build_teacher(s, model, plan.attn_impl, plan.env.is_main),
                s.mask_ratio, s.attn_weight, s.hidden_layers, s.hidden_weight, section=s)
