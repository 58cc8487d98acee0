"""What every engine shares: the interface the loop drives, AdamW, the schedule, the held modules and the
exported backbone. The loop drives every engine the same way:

    out = engine(batch); engine.backward(out["loss"]); stepped = engine.step()
    engine.save(path, meta)   # collective: every rank calls it

An engine is built from the method, the run plan and its own config sections (engine, optim), never the whole
Config. `prepare` runs before anything heavy is built, so a contradiction (a DeepSpeed overlay against the
recipe) is an error at once.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from ..engine.checkpoint import save_checkpoint
from ..engine.optim import CosineValue, WarmupCosine, build_optimizer, set_lr

if TYPE_CHECKING:  # pragma: no cover
    from ..config import EngineConfig, OptimConfig
    from ..engine.plan import RunPlan
    from ..methods.base import Method


class Engine:
    """Shared set-up; subclasses wrap `self.module` and implement the five calls the loop makes."""

    kind = "base"
    checkpoint_is_dir = False  # a checkpoint is one file (torch) or one directory per save (deepspeed)
    needs_process_group = False  # a single process still needs a (one-rank) process group (DeepSpeed)

    @classmethod
    def prepare(cls, plan: "RunPlan", engine_cfg: "EngineConfig", optim_cfg: "OptimConfig") -> dict:
        """Resolve and check what this engine kind needs before the loader and the model are built."""
        return {}

    def __init__(self, method: "Method", plan: "RunPlan", engine_cfg: "EngineConfig", optim_cfg: "OptimConfig"):
        self.plan, self.env = plan, plan.env
        self.device, self.precision, self.dtype, self.accum = plan.device, plan.precision, plan.dtype, plan.accum
        self.clip_grad, self.clip_mode = optim_cfg.clip_grad, optim_cfg.clip_mode
        self.method = method
        self.module = method.to(self.device)
        method.place_held(self.device)
        self._broadcast_held()
        # a method brings its own groups (fine-tuning: layer-wise lr decay; the base: decay / no-decay)
        self.optimizer = build_optimizer(method.param_groups(optim_cfg.weight_decay), optim_cfg, plan.peak_lr,
                                         self.device, plan.fused)
        self.schedule = WarmupCosine(plan.peak_lr, plan.total_steps, plan.warmup_steps, optim_cfg.min_lr)
        o = optim_cfg
        self.wd_schedule = None if o.weight_decay_end is None else CosineValue(o.weight_decay, o.weight_decay_end,
                                                                                 plan.total_steps)
        self.micro_step = 0
        self.global_step = 0
        self.grad_norm: Optional[torch.Tensor] = None
        self.lr = self.schedule(0)

    def describe(self) -> str:
        return self.kind

    def _broadcast_held(self) -> None:
        """Held modules start as rank 0's on every rank, as DDP and DeepSpeed do for the module they wrap: each
        rank seeds its RNG with its rank, so an EMA copied from a freshly initialised encoder (or a teacher
        initialised at random) would otherwise differ from rank to rank."""
        if not self.env.distributed:
            return
        for module in self.method.held().values():
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, src=0)

    def describe_extra(self) -> List[str]:
        return []

    @property
    def autocast(self):
        """Context for the forward pass in the compute dtype (nothing to do in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def kernels(self):
        """Context for the forward pass. On CUDA, scaled_dot_product_attention may only use fused kernels
        (flash, memory-efficient, cuDNN): inputs they cannot take fail loudly instead of silently running the
        O(N^2)-memory math fallback."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])

    def after_step(self) -> Dict[str, float]:
        """The method's after-step work (EMA updates, scalar schedules) once an optimizer step is done."""
        out = self.method.after_step(self.global_step, self.plan.total_steps)  # sees the step it follows
        self.method.steps_done = self.global_step
        # the weight decay the step just taken applied (step global_step - 1, 0-based), as lr is the one it applied
        return out if self.wd_schedule is None else {**out, "weight_decay": self.wd_schedule(self.global_step - 1)}

    def _set_lr_for_this_step(self) -> None:
        """lr (and a scheduled weight decay) for the optimizer step about to run, the global_step-th (0-based)."""
        self.lr = self.schedule(self.global_step)
        wd = None if self.wd_schedule is None else self.wd_schedule(self.global_step)
        set_lr(self.optimizer, self.lr, self.global_step, wd)

    def counters(self) -> Dict[str, Any]:
        return {"global_step": self.global_step, "micro_step": self.micro_step,
                "held": self.method.held_state_dict(), "encoder_prefix": self.method.encoder_prefix()}

    def _load_counters(self, state: Dict[str, Any]) -> None:
        self.global_step, self.micro_step = state["global_step"], state["micro_step"]
        self.method.steps_done = self.global_step
        self.method.load_held_state_dict(state.get("held", {}))  # copied into the placed tensors: device, dtype kept
        self.lr = self.schedule(self.global_step)

    def backbone_state_dict(self) -> Dict[str, torch.Tensor]:
        """The backbone's weights in fp32 on the CPU, timm-compatible keys."""
        return {k: v.detach().float().cpu() for k, v in self.method.encoder().state_dict().items()}

    def export(self, path: Path, checkpoint: Optional[Path] = None) -> Optional[Path]:
        """Write the backbone as a plain state dict (loads into timm's VisionTransformer). Every rank calls it,
        after `save` wrote `checkpoint`."""
        return save_checkpoint(path, self.backbone_state_dict()) if self.env.is_main else None
