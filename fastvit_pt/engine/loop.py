"""The one training loop. It knows only the method contract (`forward(batch) -> {"loss": ..., parts}`) and
the engine interface (`engine(batch)`, `engine.backward(loss)`, `engine.step()`): no method names here."""
from __future__ import annotations

import gc
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..config import Config, to_dict, to_yaml
from ..distributed.env import DistEnv, shutdown_distributed
from .checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    model_path,
    prune_checkpoints,
    rng_state,
    set_rng_state,
)
from .evaluate import BEST_MODEL, build_eval_loader, evaluate, read_best, write_best
from .knn_monitor import KnnMonitor
from .metrics import MetricLogger, Progress, format_eta
from .plan import make_plan


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says when and which checkpoint is the last good one."""


class RankLostError(RuntimeError):
    """Another rank died or stopped answering; this one stops too (instead of hanging) and says how to resume."""


_COMM_FAILURE = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timeout", "NCCL", "gloo")


def _is_comm_failure(err: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(err, dist_error) or (isinstance(err, RuntimeError) and any(s in str(err) for s in _COMM_FAILURE))


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Optional[Path]
    epochs_run: int
    steps: int
    is_main: bool = True  # rank 0: the process that reports
    losses: List[float] = field(default_factory=list)  # one per log interval, for tests and summaries
    evals: List[dict] = field(default_factory=list)  # {"epoch", "top1", "top5", "loss", "images", "precision"} each
    best: Optional[dict] = None  # the best evaluation so far (also in best.json; its weights in model-best.pt)
    knn: List[dict] = field(default_factory=list)  # {"epoch", "knn_top1", "knn_top5", "bank", "queries", "seconds"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_training(cfg: Config, env: DistEnv):
    """(loader, method, engine, plan) for `cfg` on this rank (no checkpoint loading, no training)."""
    import pipelines

    from ..engines import engine_class
    from ..methods import build_method

    # configuration errors (batch sizes vs world size, a conflicting DeepSpeed overlay) before any work
    plan = make_plan(cfg, env)
    engine_cls = engine_class(cfg.engine.kind)
    plan.engine_extra = engine_cls.prepare(plan, cfg.engine, cfg.optim)
    loader = pipelines.build_loader(
        cfg.data,
        img_size=cfg.model.img_size,
        batch_size=plan.micro_batch,
        rank=env.rank,
        world_size=env.world_size,
        seed=plan.seed,
        device=env.device,
        dtype=plan.dtype,
        train=True,
        views=cfg.method.views(),  # the crops the method asks for; None: the data section's one
    )
    plan.set_data(len(loader), len(loader.classes), cfg.data.path)
    plan.decide_compile(cfg)
    method = build_method(cfg.method, cfg.model, plan)
    if cfg.eval.path and not method.classifies and not cfg.eval.knn_every_epochs:
        from ..methods.configs import method_names, section_class

        classifiers = ", ".join(n for n in method_names() if section_class(n).classifies)
        raise ValueError(f"eval.path is set, but method {cfg.method.name!r} does not classify; top-1 evaluation during "
                         f"training is for classifiers (method.name: {classifiers}). To score its backbone by k-NN on "
                         "eval.path during training set eval.knn_every_epochs (e.g. 5), or use fastvit knn / linprobe.")
    engine = engine_cls(method, plan, cfg.engine, cfg.optim)
    return loader, method, engine, plan


def _gather_rng(env: DistEnv) -> list:
    state = rng_state()
    if not env.distributed:
        return [state]
    out = [None] * env.world_size
    torch.distributed.all_gather_object(out, state)
    return out


def _mean_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        torch.distributed.all_reduce(values)  # gloo has no AVG
        values /= env.world_size
    return values


def train(cfg: Config, resume: Optional[str] = None) -> TrainResult:
    from ..engines import init_for

    env = init_for(cfg.engine)
    try:
        result = _train(cfg, env, resume)
        # DDP's reducer and the gloo work it holds sit in reference cycles that outlive _train: free them now, while
        # the process group and the interpreter are alive. Left to interpreter finalisation, gloo's threads can
        # release tensors after Python is gone, and a rank aborts at exit ("terminate called without an active
        # exception"; pytorch/pytorch#179291 describes the mechanism)
        gc.collect()
        if env.distributed:
            # leave together: rank 0 still writes the last export while the others would tear their gloo pairs
            # down under it (a rank aborted at exit now and then, "terminate called without an active exception")
            torch.distributed.barrier()
        return result
    finally:
        shutdown_distributed()


def _resolve_resume(resume: Optional[str], run_dir: Path, is_main: bool) -> Optional[Path]:
    """None: a fresh run, refused where checkpoints already exist. "latest": the newest checkpoint in the
    run directory, or a fresh start when there is none. Anything else: that file."""
    found = latest_checkpoint(run_dir)
    if resume is None:
        if found is not None:
            raise CheckpointError(
                f"run directory {run_dir} already holds checkpoints ({found.name}); pass --resume to continue it, "
                "or choose another --out"
            )
        return None
    if resume == "latest":
        if found is None and is_main:
            print(f"--resume: no checkpoint in {run_dir} yet; starting from scratch", file=sys.stderr)
        return found
    return Path(resume)


def _train(cfg: Config, env: DistEnv, resume: Optional[str]) -> TrainResult:
    t = cfg.train
    run_dir = Path(t.out_dir)
    resume_path = _resolve_resume(resume, run_dir, env.is_main)
    state = load_checkpoint(resume_path) if resume_path else None  # fail before building anything
    seed_everything(t.seed + env.rank)
    loader, method, engine, plan = build_training(cfg, env)
    if env.is_main and plan.policy.source != "fixed":  # what `auto` chose, and the figures behind it
        print("\n".join(plan.policy.describe()), file=sys.stderr)
    eval_loader = build_eval_loader(cfg, env, plan.dtype) if method.classifies else None
    knn = KnnMonitor(cfg, env, plan.dtype) if cfg.eval.knn_every_epochs else None
    micro_per_epoch = plan.micro_per_epoch
    start_epoch = 0
    if state is not None:
        engine.load(resume_path, state)
        rngs = state["rng"]
        if len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
        else:
            if env.is_main:
                print(f"resuming {len(rngs)}-rank RNG states on {env.world_size} ranks: RNGs are reseeded, so masks "
                      "differ from an uninterrupted run (the data order does not depend on it)", file=sys.stderr)
            seed_everything(t.seed + env.rank + 1_000_003 * (state["epoch"] + 1))
        start_epoch = state["epoch"] + 1
        if env.is_main:
            print(f"resuming from {resume_path} (epoch {start_epoch}, step {engine.global_step}): "
                  f"{t.epochs - start_epoch} of {t.epochs} epochs to go", file=sys.stderr)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    logger = MetricLogger(run_dir, env.is_main, t.tensorboard, append=state is not None)
    imgs_per_micro = t.micro_batch * env.world_size
    result = TrainResult(run_dir, resume_path, 0, engine.global_step, env.is_main)
    result.best = read_best(run_dir) if state is not None else None
    last_saved = resume_path
    total_steps = plan.total_steps
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, t.epochs):
            if t.stop_after_epochs is not None and result.epochs_run >= t.stop_after_epochs:
                break
            loader.set_epoch(epoch)
            method.train()
            bar = Progress(env.is_main, micro_per_epoch, f"epoch {epoch + 1}/{t.epochs}")
            sums: Dict[str, torch.Tensor] = {}
            scalars: Dict[str, float] = {}
            n_micro, tic = 0, time.perf_counter()
            for i, batch in enumerate(loader):
                if i >= micro_per_epoch:
                    break
                out = engine(batch)
                engine.backward(out["loss"])
                stepped = engine.step()
                if stepped:
                    scalars = engine.after_step()  # EMA updates, schedules of any scalar (momentum, temperature)
                for k, v in out.items():  # device-side sums: no host sync here
                    if torch.is_tensor(v) and v.ndim == 0:
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                n_micro += 1
                last = i + 1 == micro_per_epoch
                if stepped and (engine.global_step % t.log_every == 0 or last):
                    keys = sorted(sums)
                    # this .item() is the host-device sync point, once per log interval
                    vals = _mean_over_ranks(torch.stack([sums[k] for k in keys]) / n_micro, env).tolist()
                    parts = dict(zip(keys, vals))
                    elapsed = time.perf_counter() - tic
                    rate = n_micro * imgs_per_micro / elapsed
                    if not all(math.isfinite(v) for v in vals):
                        raise NonFiniteLossError(
                            f"loss became non-finite ({parts}) at epoch {epoch + 1}, optimizer step {engine.global_step}; "
                            f"stopping. The last good checkpoint is {last_saved or '(none yet)'}. "
                            "Lower optim.blr, set optim.clip_grad, or use engine.precision=bf16 instead of fp16."
                        )
                    result.losses.append(parts["loss"])
                    grad = {"grad_norm": float(engine.grad_norm)} if engine.grad_norm is not None else {}
                    logger.log(
                        engine.global_step,
                        {"epoch": epoch + (i + 1) / micro_per_epoch, "lr": engine.lr, "img_per_s": rate, **parts, **grad,
                         **scalars},
                    )
                    eta = (total_steps - engine.global_step) * engine.accum * imgs_per_micro / rate
                    bar.update(0, {"loss": f"{parts['loss']:.4f}", "img/s": f"{rate:.0f}", "eta": format_eta(eta)})
                    sums, n_micro, tic = {}, 0, time.perf_counter()
                bar.update(1)
            bar.close()
            result.epochs_run += 1
            result.steps = engine.global_step
            if eval_loader is not None and ((epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == t.epochs):
                # the precision is part of the score: model-best.pt re-scores it exactly when evaluated the same way
                ev = {"epoch": epoch + 1, **evaluate(engine, eval_loader, env, f"eval {epoch + 1}/{t.epochs}"),
                      "precision": engine.precision}
                result.evals.append(ev)
                logger.log(engine.global_step, {f"eval_{k}": v for k, v in ev.items()})
                if result.best is None or ev["top1"] > result.best["top1"]:
                    result.best = ev
                    engine.export(run_dir / BEST_MODEL)  # the weights that scored, as evaluated
                    if env.is_main:
                        write_best(run_dir, ev)
                if env.is_main:
                    print(f"eval epoch {epoch + 1}: top-1 {ev['top1']:.2f}%  top-5 {ev['top5']:.2f}%  loss {ev['loss']:.4f}"
                          f"  (best top-1 {result.best['top1']:.2f}% at epoch {result.best['epoch']})", file=sys.stderr)
            if (epoch + 1) % t.save_every_epochs == 0 or epoch + 1 == t.epochs:
                meta = {"epoch": epoch, "rng": _gather_rng(env), "config": to_dict(cfg), "engine_kind": engine.kind}
                path = checkpoint_path(run_dir, epoch + 1, directory=engine.checkpoint_is_dir)
                engine.save(path, meta)  # collective
                engine.export(model_path(run_dir, epoch + 1), path)
                if env.is_main:
                    last_saved = path
                    prune_checkpoints(run_dir, t.keep_checkpoints)
            # after the save: a failure while scoring (a bad image in eval.path) costs no training
            if knn is not None and ((epoch + 1) % cfg.eval.knn_every_epochs == 0 or epoch + 1 == t.epochs):
                kn = {"epoch": epoch + 1, **knn(engine, f"knn {epoch + 1}/{t.epochs}")}
                result.knn.append(kn)
                logger.log(engine.global_step, {"epoch": epoch + 1, "knn_top1": kn["knn_top1"],
                                                "knn_top5": kn["knn_top5"], "knn_images": kn["queries"]})
                if env.is_main:
                    print(f"knn epoch {epoch + 1}: top-1 {kn['knn_top1']:.2f}%  top-5 {kn['knn_top5']:.2f}%  (bank "
                          f"{kn['bank']}, queries {kn['queries']}, {kn['seconds']:.1f} s)", file=sys.stderr)
    except Exception as err:
        if env.distributed and _is_comm_failure(err) and not isinstance(err, NonFiniteLossError):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RankLostError(
                f"rank {env.rank}: lost contact with another rank at epoch {epoch + 1}, optimizer step "
                f"{engine.global_step} ({first}); stopping. Look for the first failing rank in the logs, then resume "
                f"with --resume (last checkpoint: {last_saved or 'none yet'})."
            ) from err
        raise
    finally:
        logger.close()
    result.checkpoint = last_saved
    return result
