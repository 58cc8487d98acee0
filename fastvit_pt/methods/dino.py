"""DINO for ViTs (facebookresearch/dino, main_dino.py, vision_transformer.py DINOHead, utils.py MultiCropWrapper):
self-distillation of a student from an EMA teacher. The student sees 2 global crops and N local ones (each size
through the same ViT, its position embedding resampled), the teacher the 2 global crops; the student's softmax
over out_dim prototypes (temperature 0.1) is trained towards the teacher's centred, sharpened softmax of every
other crop.

Schedules, as main_dino.py: the teacher's momentum on a half-cosine from method.momentum to 1 per iteration, the
teacher temperature warmed up linearly per epoch, the centre an EMA (0.9) of the teacher's mean output over the
global batch (every rank's, every micro-batch's). Weight decay 0.04 -> 0.4 on a cosine and DINO's per-parameter gradient clipping are optimizer settings
(optim.weight_decay_end, optim.clip_mode=param: recipes/dino_tiny_300ep.yaml), not the method's.

Where this differs from the reference, and why:
- The head's last layer is frozen during the first method.freeze_last_layer epochs by a learning rate of 0 for
  its parameter group (optim `frozen_steps`), where DINO drops its gradients (p.grad = None). Same weights; but
  the engine never has to touch per-parameter gradients, which DeepSpeed keeps in flat partitioned buffers, so it
  works on every engine. AdamW's moments of that layer then start warm when it starts moving.
  With SGD, its momentum buffer likewise fills during the frozen epochs. A resumed run keeps the frozen steps
  its optimizer state was saved with.
- The EMA update runs in `after_step` after optimizer step t with momentum_schedule[t], as DINO does right after
  its optimizer step. The centre is updated there too, once per optimizer step from the teacher outputs of all its
  micro-batches (DINO updates it in the loss, once per iteration, without gradient accumulation): the same update
  at any accumulation, and no collective in the forward pass.
- The head's last layer, the loss, the centre and the softmaxes are computed in fp32 (DINO: in the AMP dtype); a
  65,536-way softmax of cosine logits at temperature 0.04 loses precision in bf16 for nothing (~0.1 nat of noise in
  the teacher's targets), and the layer is ~3% of a step's FLOPs.
- The weight-normalised last layer is computed explicitly (W = g v / ||v|| per row, DINO's weight_g / weight_v
  names), not through torch's deprecated nn.utils.weight_norm hooks.
- Position embeddings for local crops are resampled as timm does (models/vit.py patch_pos_embed), without DINO's
  +0.1 scale offset.
- The exported backbone (encoder()) is the student's, as for every method here; DINO publishes and evaluates the
  teacher's, which every checkpoint holds (engine state "held" -> "teacher", keys backbone.*).
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.optim import CosineValue, param_groups
from ..models import VisionTransformer, create_model
from .base import Method, ema_update_, held_compute, world_size
from .configs import DINOConfig


class WeightNormLinear(nn.Module):
    """nn.utils.weight_norm(nn.Linear(in_dim, out_dim, bias=False)): W = g v / ||v|| per output row. DINO fills g
    with 1 and, with norm_last_layer, never trains it."""

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # DINO: the default nn.Linear initialisation
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.weight_v = nn.Parameter(v.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, out_dim] fp32, computed in fp32 whatever the autocast or module dtype."""
        with torch.autocast(x.device.type, enabled=False):
            v = self.weight_v.float()
            return F.linear(x.float(), v * (self.weight_g.float() / v.norm(dim=1, keepdim=True)))


class DINOHead(nn.Module):
    """DINO's head: MLP (Linear + GELU, hidden_dim wide) to bottleneck_dim, L2-normalised, then the weight-normalised
    last layer to out_dim prototypes. Linear layers of the MLP trunc-normal (0.02), biases zero."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        mlp: List[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(layers - 2):
            mlp += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        mlp.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, out_dim]"""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCrop(nn.Module):
    """DINO's MultiCropWrapper: consecutive crops of one size go through the backbone as one batch, then every
    crop's feature through the head. crops: a list of [N, C, h, w] -> [len(crops) N, out_dim], crop-major."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: List[torch.Tensor]) -> torch.Tensor:
        feats, start = [], 0
        for end in range(1, len(crops) + 1):
            if end == len(crops) or crops[end].shape[-2:] != crops[start].shape[-2:]:
                feats.append(self.backbone(torch.cat(crops[start:end]) if end - start > 1 else crops[start]))
                start = end
        return self.head(torch.cat(feats))


class Teacher(MultiCrop):
    """The EMA teacher and the centre of its outputs (DINOLoss's buffer), held together: fp32, saved. Between
    optimizer steps `pending` sums the teacher outputs the micro-batches saw (not saved: zero at every step's end),
    and `temp` is the teacher temperature of the current step (a tensor: torch.compile reads it without a guard)."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead, out_dim: int):
        super().__init__(backbone, head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("pending", torch.zeros(1, out_dim + 1), persistent=False)  # sum of outputs, count
        self.register_buffer("temp", torch.zeros(()), persistent=False)


def dino_init_(vit: VisionTransformer) -> None:
    """dino vision_transformer.py's initialisation: position embedding, cls token and every Linear trunc-normal
    (0.02), biases zero, LayerNorms (1, 0); the patch projection keeps nn.Conv2d's default."""
    nn.init.trunc_normal_(vit.pos_embed, std=0.02)
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    vit.patch_embed.proj.reset_parameters()


class DINO(Method):
    def __init__(self, student: VisionTransformer, teacher: VisionTransformer, section: DINOConfig,
                 steps_per_epoch: int = 0):
        super().__init__(section)
        for enc in (student, teacher):
            if not isinstance(enc, VisionTransformer) or enc.num_classes != 0:
                raise ValueError(f"method 'dino' needs a ViT encoder without a head, got {type(enc).__name__}")
        s = section
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.n_crops = 2 + s.local_crops
        head = DINOHead(student.embed_dim, s.out_dim, s.hidden_dim, s.bottleneck_dim, s.head_layers, s.norm_last_layer)
        self.student = MultiCrop(student, head)
        teacher.load_state_dict(student.state_dict())  # DINO: the teacher starts as the student
        # held, not assigned: an nn.Module attribute would join the module tree (wrapped, cast, optimised)
        self.hold("teacher", Teacher(teacher, copy.deepcopy(head), s.out_dim), saved=True)
        self.steps_done = self.steps_done  # the temperature of step 0

    @property
    def steps_done(self) -> int:
        return self._steps_done

    @steps_done.setter
    def steps_done(self, n: int) -> None:
        """Set by the engine after each step and on resume: the teacher temperature follows."""
        self._steps_done = n
        if "teacher" in self._held:
            self.teacher.temp.fill_(self.teacher_temp())

    @property
    def teacher(self) -> Teacher:
        return self.held()["teacher"]

    def teacher_temp(self) -> float:
        """DINOLoss's teacher_temp_schedule[epoch]: linear from warmup_teacher_temp to teacher_temp over the warm-up
        epochs (np.linspace's points), then constant."""
        s, epoch = self.section, self.steps_done // self.steps_per_epoch
        n = s.warmup_teacher_temp_epochs
        if epoch >= n:
            return s.teacher_temp
        return s.warmup_teacher_temp + (s.teacher_temp - s.warmup_teacher_temp) * (epoch / (n - 1) if n > 1 else 0.0)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        """batch.views: 2 global crops [N, C, H, W], then the local ones [N, C, h, w] -> {"loss": DINO's loss}."""
        crops = batch.views
        if len(crops) != self.n_crops:
            raise ValueError(f"method dino needs 2 global + {self.n_crops - 2} local crops per image; the loader gave "
                             f"{len(crops)} (build it with the method's views)")
        student = self.student(crops)
        with torch.no_grad(), held_compute(crops[0]):
            teacher = self.teacher(crops[:2])
        return {"loss": self.loss(student, teacher)}

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """DINOLoss.forward: student [n_crops N, K], teacher [2 N, K] -> the mean over (teacher crop, other student
        crop) pairs of the cross-entropy between the teacher's centred softmax and the student's. In fp32. The
        teacher's outputs are set aside for the centre's update after the optimizer step (`update_center`)."""
        s, held = self.section, self.teacher
        log_p = F.log_softmax(student.float() / s.student_temp, dim=-1).chunk(self.n_crops)
        teacher = teacher.float()
        q = F.softmax((teacher - held.center) / held.temp, dim=-1).chunk(2)
        total, terms = student.new_zeros((), dtype=torch.float32), 0
        for iq, qi in enumerate(q):
            for v, lp in enumerate(log_p):
                if v != iq:
                    total = total + torch.sum(-qi * lp, dim=-1).mean()
                    terms += 1
        with torch.no_grad():
            held.pending[:, :-1] += teacher.sum(dim=0, keepdim=True)
            held.pending[:, -1] += teacher.shape[0]
        return total / terms

    @torch.no_grad()
    def update_center(self) -> None:
        """centre <- m centre + (1 - m) mean of the teacher's outputs since the last update, over every rank (one
        all-reduce of the sums and the count); the sums are then cleared."""
        held = self.teacher
        pending = held.pending
        if world_size() > 1:
            pending = pending.clone()
            torch.distributed.all_reduce(pending)
        m = self.section.center_momentum
        # count 0 (no forward since the last update): the centre stays (0 / 0 is guarded by the clamp)
        mean = pending[:, :-1] / pending[:, -1:].clamp_min(1.0)
        held.center.copy_(torch.where(pending[:, -1:] > 0, held.center * m + mean * (1.0 - m), held.center))
        held.pending.zero_()

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> Dict[str, float]:
        """After optimizer step `step` (1-based): the centre's update, then the EMA update of the teacher with DINO's
        momentum_schedule[step - 1] (half-cosine from method.momentum to method.momentum_end). Logs the momentum and
        the teacher temperature this step used."""
        s = self.section
        self.update_center()
        m = CosineValue(s.momentum, s.momentum_end, total_steps)(step - 1)
        ema_update_(list(self.teacher.parameters()), list(self.student.parameters()), m)
        return {"momentum": m, "teacher_temp": self.teacher_temp()}

    def encoder(self) -> nn.Module:
        return self.student.backbone

    def param_groups(self, weight_decay: float) -> List[Dict]:
        """DINO's get_params_groups (decay on matrices and tokens, none on biases and 1-D parameters), with the head's
        last layer in a group of its own, frozen for the first freeze_last_layer epochs."""
        last = [p for p in self.student.head.last_layer.parameters() if p.requires_grad]
        ids = {id(p) for p in last}
        groups = param_groups(self, weight_decay)
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        groups.append({"params": last, "weight_decay": weight_decay, "lr_scale": 1.0,  # DINO decays its 2-D g and v
                       "frozen_steps": self.section.freeze_last_layer * self.steps_per_epoch})
        return [g for g in groups if g["params"]]

    def describe(self) -> List[str]:
        s = self.section
        return [f"{s.local_crops} local crops at {s.local_size} px, head {s.head_layers}x{s.hidden_dim}->"
                f"{s.bottleneck_dim}->{s.out_dim}, teacher momentum {s.momentum} -> {s.momentum_end} (cosine), "
                f"teacher temperature {s.warmup_teacher_temp} -> {s.teacher_temp} over {s.warmup_teacher_temp_epochs} "
                f"epochs, last layer frozen for {s.freeze_last_layer} epoch(s)"]


def build(section: DINOConfig, m, plan) -> DINO:
    if section.local_crops and section.local_size % m.patch_size:
        raise ValueError(f"method.local_size={section.local_size} is not a multiple of model.patch_size={m.patch_size}")

    def vit(drop_path: float) -> VisionTransformer:
        # a pre-training recipe's mae_* name names the same encoder; DINO's ViT: learned positions, cls token
        enc = create_model(m.name.removeprefix("mae_"), img_size=m.img_size, patch_size=m.patch_size,
                           in_chans=m.in_chans, num_classes=0, global_pool="token", drop_path_rate=drop_path,
                           attn_impl=plan.attn_impl)
        dino_init_(enc)
        return enc

    # the teacher is built without stochastic depth (DINO builds it without drop_path_rate), then copies the student
    return DINO(vit(m.drop_path), vit(0.0), section, plan.steps_per_epoch)
