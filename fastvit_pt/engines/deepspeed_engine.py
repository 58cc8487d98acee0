"""DeepSpeed engine: the only file that imports deepspeed (lazily, when the engine is built).

The DeepSpeed config is generated from the typed config (`deepspeed_config`): batch sizes and accumulation
checked against the world size, bf16 or fp16 with dynamic loss scaling, the ZeRO stage and clipping. An
expert overlay (engine.deepspeed_config, a JSON file) is merged on top; it may add keys, never contradict
the recipe. The optimizer is our torch AdamW (fused kernel on CUDA, foreach on CPU, where DeepSpeed's
FusedAdam would JIT-build for a minute or more); the learning-rate schedule stays ours, set per iteration.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..config import ConfigError
from ..engine.checkpoint import META, CheckpointError, save_checkpoint
from .base import Engine

# DeepSpeed's own progress print; ours is the progress bar and metrics.jsonl
_NEVER = 2**31 - 1
# ZeRO's all-gather goes through a torch API deprecated in 2.14; the warning is DeepSpeed's to fix, not the user's
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def deepspeed_config(plan, engine_cfg, optim_cfg) -> Dict[str, Any]:
    """The DeepSpeed JSON config for the run `plan` describes, overlay merged. Raises ConfigError before any
    work starts when the overlay contradicts the recipe."""
    e = engine_cfg
    out: Dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accum,
        "zero_optimization": {"stage": e.zero_stage},
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "gradient_clipping": optim_cfg.clip_grad or 0.0,
        # our AdamW is a client optimizer; ZeRO partitions its state like any torch optimizer's
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if plan.precision == "bf16":
        out.update(_bf16_master_fp32(e.zero_stage))
    if e.deepspeed_config:
        path = Path(e.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"engine.deepspeed_config: file not found: {path}")
        try:
            overlay = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"engine.deepspeed_config: {path} is not valid JSON: {err}") from None
        if not isinstance(overlay, dict):
            raise ConfigError(f"engine.deepspeed_config: {path} must hold a JSON object")
        _merge_overlay(out, overlay, str(path))
    return out


def _bf16_master_fp32(stage: int) -> Dict[str, Any]:
    """What keeps DeepSpeed's bf16 numerically where the torch engine is (fp32 weights and gradients, bf16 only
    inside autocast's matmuls). DeepSpeed casts the module to bf16 and, left alone, accumulates and reduces the
    gradients in bf16 too. ZeRO-1 with fp32 gradient accumulation is its BF16_Optimizer: fp32 master weights,
    gradients accumulated over micro-batches and all-reduced in fp32. ZeRO-2 keeps fp32 master partitions and
    reduces in fp32 here (communication_data_type), but adds micro-batch gradients in bf16 (DeepSpeed has no fp32
    accumulation there). ZeRO-0 has neither (the optimizer steps the bf16 weights): refused."""
    if stage == 0:
        raise ConfigError("engine.kind=deepspeed with engine.precision=bf16 needs engine.zero_stage 1 or 2: at ZeRO-0 "
                          "DeepSpeed keeps no fp32 master weights (the optimizer updates bf16 weights with bf16 "
                          "gradients); use engine.zero_stage=1, engine.precision=fp32, or engine.kind=torch")
    if stage == 1:
        return {"data_types": {"grad_accum_dtype": "fp32"}}
    return {"communication_data_type": "fp32"}


def _merge_overlay(base: Dict[str, Any], overlay: Dict[str, Any], source: str, where: str = "") -> None:
    for key, value in overlay.items():
        if key in ("optimizer", "scheduler"):
            raise ConfigError(
                f"engine.deepspeed_config: {source} sets '{where}{key}'; the optimizer and its schedule come from "
                "the recipe's optim section"
            )
        if key not in base:
            base[key] = value
        elif isinstance(base[key], dict) and isinstance(value, dict):
            _merge_overlay(base[key], value, source, f"{where}{key}.")
        elif base[key] != value:
            raise ConfigError(
                f"engine.deepspeed_config: {source} sets '{where}{key}' to {value!r}, but the recipe gives "
                f"{base[key]!r}; change the recipe (train.*, engine.*, optim.clip_grad) instead of the overlay"
            )


class DeepSpeedEngine(Engine):
    kind = "deepspeed"
    checkpoint_is_dir = True
    needs_process_group = True

    @classmethod
    def prepare(cls, plan, engine_cfg, optim_cfg) -> dict:
        if optim_cfg.clip_grad is not None and optim_cfg.clip_mode != "norm":
            raise ConfigError(f"optim.clip_mode={optim_cfg.clip_mode}: DeepSpeed clips the global gradient norm only "
                              "(its gradients are flat partitioned buffers); use optim.clip_mode=norm with "
                              "engine.kind=deepspeed, or engine.kind=torch")
        return {"ds_config": deepspeed_config(plan, engine_cfg, optim_cfg)}

    def __init__(self, method, plan, engine_cfg, optim_cfg):
        super().__init__(method, plan, engine_cfg, optim_cfg)
        self.ds_config = plan.engine_extra["ds_config"]  # resolved once, by prepare(), before anything was built
        # deepspeed.initialize asserts on LOCAL_RANK even where the process group already exists (one process)
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))
        import deepspeed

        self.ds, _, _, _ = deepspeed.initialize(
            model=self.module, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False
        )
        if plan.compile:
            self.ds.compile()
        self.zero_stage = engine_cfg.zero_stage

    def describe(self) -> str:
        return f"deepspeed, ZeRO-{self.zero_stage}"

    def describe_extra(self):
        return [f"deepspeed       {json.dumps(self.ds_config, sort_keys=True)}"]

    @property
    def autocast(self):
        """DeepSpeed casts the module itself to the compute dtype (bf16/fp16 sections); batches arrive in it."""
        return contextlib.nullcontext()

    def __call__(self, batch) -> Dict[str, torch.Tensor]:
        with self.kernels():
            return self.ds(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self) -> bool:
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary:
            self._set_lr_for_this_step()
        self.ds.step()  # every micro-step: DeepSpeed counts them and steps the optimizer on the boundary
        self.micro_step += 1
        if not boundary:
            return False
        self.global_step += 1
        norm = self.ds.get_global_grad_norm()
        self.grad_norm = None if norm is None else torch.as_tensor(norm)
        return True

    def save(self, path: Path, meta: Dict[str, Any]) -> Optional[Path]:
        """Collective: DeepSpeed writes the module (rank 0) and every rank's ZeRO partition into `path/`; then
        rank 0 writes fastvit.pt, which marks the directory complete."""
        path = Path(path)
        self.ds.save_checkpoint(str(path.parent), tag=path.name, client_state={}, save_latest=False)
        if self.env.distributed:
            torch.distributed.barrier()
        if not self.env.is_main:
            return None
        engine = {**self.counters(), "world_size": self.env.world_size, "zero_stage": self.zero_stage}
        save_checkpoint(path / META, {**meta, "engine": engine})
        return path

    def load(self, path: Path, meta: Dict[str, Any]) -> None:
        path = Path(path)
        saved = meta["engine"]
        if not path.is_dir() or "zero_stage" not in saved:
            raise CheckpointError(
                f"{path} was written by the torch engine; engine.kind=deepspeed resumes from the checkpoint "
                "directories it writes (resume with engine.kind=torch, or start a new run)"
            )
        if saved["zero_stage"] != self.zero_stage:
            raise CheckpointError(
                f"{path} was written with engine.zero_stage={saved['zero_stage']}, this run has {self.zero_stage}; "
                f"resume with engine.zero_stage={saved['zero_stage']}"
            )
        if saved["world_size"] != self.env.world_size and self.zero_stage > 0:
            raise CheckpointError(
                f"{path} holds ZeRO-{self.zero_stage} optimizer state partitioned over {saved['world_size']} ranks and "
                f"this run has {self.env.world_size}; DeepSpeed 0.19 cannot repartition it on load. Resume on "
                f"{saved['world_size']} ranks (ZeRO-0 checkpoints resume under any world size)."
            )
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint to load in {path}")
        self._load_counters(saved)

    def export(self, path: Path, checkpoint: Optional[Path] = None) -> Optional[Path]:
        """Under bf16/fp16 with ZeRO-1/2 the module holds 16-bit weights and the fp32 master copy is partitioned
        over the ranks' optimizers (ZeRO's, or BF16_Optimizer's under fp32 gradient accumulation): each
        parameter's is assembled with DeepSpeed's safe_get_full_fp32_param, a collective, so every rank calls
        this; rank 0 writes."""
        sd = self.backbone_state_dict()
        if self.precision != "fp32" and self.zero_stage > 0:
            from deepspeed.utils import safe_get_full_fp32_param

            prefix = self.method.encoder_prefix()
            params = dict(self.module.named_parameters())
            for k in sd:
                if prefix + k in params:
                    master = safe_get_full_fp32_param(params[prefix + k])
                    if master is not None:
                        sd[k] = master.detach().float().cpu().view_as(sd[k])
        return save_checkpoint(path, sd) if self.env.is_main else None

