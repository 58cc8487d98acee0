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
        if engine_cfg.compile:
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
        over the ranks' optimizer states: it is consolidated from the checkpoint just written, with DeepSpeed's
        own zero_to_fp32 reader. (ZeRO-0 under bf16 exports the module's weights, up-cast.) Every rank calls it;
        rank 0 writes."""
        if not self.env.is_main:
            return None
        sd = self.backbone_state_dict()
        if self.precision != "fp32" and self.zero_stage > 0 and checkpoint is not None:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            master = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
            prefix = self.method.encoder_prefix()
            sd = {k: master[prefix + k].float() if prefix + k in master else v for k, v in sd.items()}
        return save_checkpoint(path, sd)

