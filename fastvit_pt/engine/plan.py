"""The run plan: every fact a run derives from its config and its environment, resolved once, here, and handed
to the method, the engine and the loop (torchtitan's per-component build arguments). Nothing downstream
re-derives precision, accumulation or the schedule's length from the whole Config.

`fastvit train --dry-run` prints it (`describe_plan`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

import torch

from ..config import Config
from ..distributed.env import DistEnv
from .policy import StepPolicy, decide_compile, resolve_step_policy

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.config import PipelineConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"train.global_batch ({global_batch}) is not a multiple of train.micro_batch ({micro_batch}) x world size "
            f"({world_size}) = {per_step}; choose micro_batch so that global_batch / (micro_batch * world_size) is whole"
        )
    return global_batch // per_step


def _on_rank0(fn, env: DistEnv):
    """fn() on rank 0, its result broadcast to every rank (one decision per run, even where measurements would
    differ between ranks); fn() everywhere without a process group."""
    if not (env.distributed and torch.distributed.is_initialized()):
        return fn()
    box = [fn() if env.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class RunPlan:
    env: DistEnv
    """Rank, world size and device of this process."""
    precision: str
    """bf16, fp16 or fp32 (engine.precision resolved for the device)."""
    attn_impl: str
    """sdpa or math (model.attn_impl resolved for the device and precision)."""
    fused: bool
    global_batch: int
    micro_batch: int
    accum: int
    """Micro-batches per optimizer step on each rank."""
    epochs: int
    peak_lr: float
    warmup_epochs: float
    seed: int
    data: "PipelineConfig"
    """The data section (the method reads its normalisation statistics; the loader all of it)."""
    steps_per_epoch: int = 0
    """Optimizer steps per epoch: set once the loader is built (`set_data`)."""
    num_classes: int = 0
    compile: bool = False
    """torch.compile (engine.compile resolved by `decide_compile`, once the schedule's length is known)."""
    policy: Optional[StepPolicy] = None
    """How precision, attention, AdamW and compile were chosen, and the figures behind it (engine/policy.py)."""
    engine_extra: dict = field(default_factory=dict)
    """What the engine kind resolved before anything was built (DeepSpeed: its JSON config)."""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_epochs * self.steps_per_epoch))

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def decide_compile(self, cfg: Config) -> None:
        """engine.compile for this run's length (auto: measured, engine/policy.py), the same on every rank."""
        self.policy = _on_rank0(lambda: decide_compile(self.policy, cfg, self.device, self.total_steps), self.env)
        self.compile = bool(self.policy.compile)

    def set_data(self, micro_batches_per_epoch: int, num_classes: int, path: str = "") -> None:
        self.steps_per_epoch = micro_batches_per_epoch // self.accum
        self.num_classes = num_classes
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.path {path} gives {micro_batches_per_epoch} micro-batches of {self.micro_batch} per rank per "
                f"epoch, fewer than one optimizer step of train.global_batch={self.global_batch}; lower the batch sizes"
            )


def make_plan(cfg: Config, env: DistEnv) -> RunPlan:
    """Resolve precision, attention, the optimizer's kernel and accumulation for `cfg` on this rank (the `auto`
    ones measured or read from the cache on rank 0: engine/policy.py); raises before any work when the batch
    sizes and the world size disagree."""
    if cfg.engine.precision == "fp16" and env.device.type != "cuda":
        raise ValueError("engine.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    t = cfg.train
    accum = accumulation_steps(t.global_batch, t.micro_batch, env.world_size)
    policy = _on_rank0(lambda: resolve_step_policy(cfg, env.device, env.is_main), env)
    return RunPlan(
        env=env, precision=policy.precision, attn_impl=policy.attn_impl, fused=policy.fused, policy=policy,
        global_batch=t.global_batch, micro_batch=t.micro_batch, accum=accum, epochs=t.epochs,
        peak_lr=cfg.peak_lr, warmup_epochs=cfg.optim.warmup_epochs, seed=t.seed, data=cfg.data,
    )


def bench_plan(cfg: Config, env: DistEnv, num_classes: int = 1000) -> RunPlan:
    """A plan for timing steps without a data set (`fastvit bench model`): a schedule too long to end."""
    from ..engines import engine_class

    plan = make_plan(cfg, env)
    plan.engine_extra = engine_class(cfg.engine.kind).prepare(plan, cfg.engine, cfg.optim)
    plan.set_data(10**6 * plan.accum, num_classes)
    plan.compile = cfg.engine.compile is True  # timing a case: compile only where the case asks for it
    return plan


def describe_plan(cfg: Config) -> str:
    """`fastvit train --dry-run`: build what a run would build on this rank and say what it would do."""
    from ..distributed.env import shutdown_distributed
    from ..engines import init_for
    from .loop import build_training

    env = init_for(cfg.engine)
    try:
        loader, method, engine, plan = build_training(cfg, env)
    finally:
        shutdown_distributed()
    n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    t = cfg.train
    views = method.views()
    lines: List[Optional[str]] = [
        f"run directory   {t.out_dir}",
        f"method          {cfg.method.name} on {cfg.model.name} ({n_params / 1e6:.2f} M trainable parameters)",
        *(f"                {line}" for line in method.describe()),
        f"attention       {plan.attn_impl} (model.attn_impl={cfg.model.attn_impl})",
        *plan.policy.describe(),
        f"device          {env.device}, {plan.precision} (engine.precision={cfg.engine.precision}), "
        f"world size {env.world_size}",
        f"data            {cfg.data.backend}: {loader.num_samples} images, {len(loader.classes)} classes in {cfg.data.path}",
        f"views           {len(views)} per image: " + ", ".join(f"{v.size or cfg.model.img_size} px" for v in views)
        if views else None,
        f"engine          {engine.describe()}" + (", torch.compile" if plan.compile else ""),
        f"batch           {t.global_batch} global = {t.micro_batch} micro x {env.world_size} ranks x {plan.accum} accumulation",
        f"schedule        {t.epochs} epochs x {plan.steps_per_epoch} steps = {plan.total_steps} optimizer steps, "
        f"peak lr {plan.peak_lr:.3g}, warm-up {cfg.optim.warmup_epochs:g} epochs",
    ]
    scales = sorted({g.get("lr_scale", 1.0) for g in engine.optimizer.param_groups})
    o = cfg.optim
    wd = f"{o.weight_decay:g}" + ("" if o.weight_decay_end is None else f" -> {o.weight_decay_end:g} (cosine)")
    how = "per parameter" if o.clip_mode == "param" else "global norm"
    clip = "no clipping" if o.clip_grad is None else f"clip {o.clip_grad:g} ({how})"
    lines.append(f"optimizer       {o.optimizer}, {len(engine.optimizer.param_groups)} parameter groups, "
                 f"lr scales {scales[0]:.3g}..{scales[-1]:.3g}, weight decay {wd}, {clip}")
    e = cfg.eval
    if e.path and method.classifies:
        lines.append(f"eval            {e.path} every {e.every_epochs} epoch(s), best kept as model-best.pt")
    if e.knn_every_epochs:
        bank = f"up to {e.knn_train_samples} images" if e.knn_train_samples else "all images"
        lines.append(f"knn monitor     {e.path} against {bank} of {e.knn_train or cfg.data.path} every "
                     f"{e.knn_every_epochs} epoch(s), k={cfg.knn.k}, T={cfg.knn.temperature:g}")
    lines += engine.describe_extra()
    return "\n".join(line for line in lines if line is not None)
