"""`fastvit train --dry-run`: build what a run would build on this rank and say what it would do."""
from __future__ import annotations

from ..config import Config


def describe_plan(cfg: Config) -> str:
    from ..distributed.env import init_distributed, shutdown_distributed
    from .loop import build_training, resolve_attn_impl

    env = init_distributed(cfg.engine.device, cfg.engine.dist_timeout_s, group_of_one=cfg.engine.kind == "deepspeed")
    try:
        loader, method, engine, steps_per_epoch = build_training(cfg, env)
    finally:
        shutdown_distributed()
    n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    t = cfg.train
    lines = [
        f"run directory   {t.out_dir}",
        f"method          {cfg.method.name} on {cfg.model.name} ({n_params / 1e6:.2f} M trainable parameters)",
        f"attention       {resolve_attn_impl(cfg.model.attn_impl, env.device, engine.precision)} "
        f"(model.attn_impl={cfg.model.attn_impl})",
        f"device          {env.device}, {engine.precision} (engine.precision={cfg.engine.precision}), "
        f"world size {env.world_size}",
        f"data            {cfg.data.backend}: {loader.num_samples} images, {len(loader.classes)} classes in {cfg.data.path}",
        f"engine          {cfg.engine.kind}" + (f", ZeRO-{cfg.engine.zero_stage}" if cfg.engine.kind == "deepspeed" else "")
        + (", torch.compile" if cfg.engine.compile else ""),
        f"batch           {t.global_batch} global = {t.micro_batch} micro x {env.world_size} ranks x {engine.accum} accumulation",
        f"schedule        {t.epochs} epochs x {steps_per_epoch} steps = {t.epochs * steps_per_epoch} optimizer steps, "
        f"peak lr {cfg.peak_lr:.3g}, warm-up {cfg.optim.warmup_epochs:g} epochs",
    ]
    scales = sorted({g.get("lr_scale", 1.0) for g in engine.optimizer.param_groups})
    lines.append(f"optimizer       {cfg.optim.optimizer}, {len(engine.optimizer.param_groups)} parameter groups, "
                 f"lr scales {scales[0]:.3g}..{scales[-1]:.3g}")
    if cfg.method.name == "finetune":
        lines.append(f"init            {cfg.finetune.init}")
    if cfg.eval.path:
        lines.append(f"eval            {cfg.eval.path} every {cfg.eval.every_epochs} epoch(s), best kept as model-best.pt")
    if cfg.engine.kind == "deepspeed":
        import json

        lines.append(f"deepspeed       {json.dumps(engine.ds_config, sort_keys=True)}")
    return "\n".join(lines)
