"""Throughput: model-only train steps (forward + backward + AdamW) on synthetic input, loader-only epochs,
and end-to-end training steps. After warm-up, medians; all cases of one call run in one process, model
cases timed in turns, so their ratios are fair on a noisy machine."""
from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    steps_fns: Sequence[Callable[[], None]], device: torch.device, steps: int, warmup: int,
    progress: Optional[Callable] = None,
) -> List[List[float]]:
    """Seconds per call of each function, timed in turns (A B C A B C ...) after each one's warm-up: a slow
    spell of a noisy machine then lands on every case alike, and their ratios stay fair."""
    for fn in steps_fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: List[List[float]] = [[] for _ in steps_fns]
    for _ in range(steps):
        for fn, out in zip(steps_fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
            if progress:
                progress()
    return times


def _train_step(module: nn.Module, loss_fn: Callable[[], torch.Tensor], precision: str, device: torch.device):
    from .engine.optim import build_adamw, param_groups

    opt = build_adamw(param_groups(module, 0.05), 1e-4, (0.9, 0.95), 1e-8, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _engine_config(model: str, batch: int, img_size: int, patch_size: int, precision: str, device: str,
                   engine: str, attn: str, method: str = "mae", method_fields: Optional[Dict] = None,
                   extra: Optional[Dict] = None):
    """A config for one bench row; `method_fields` are set where the method's section has them (mask_ratio for
    the MAE family, teacher for distillation), so no method is named here."""
    from .config import load_config

    over = {"model.name": model, "model.img_size": img_size, "model.patch_size": patch_size, "model.attn_impl": attn,
            "method.name": method, "engine.kind": engine, "engine.precision": precision,
            "engine.device": device, "train.global_batch": batch, "train.micro_batch": batch, "optim.warmup_epochs": 0,
            "optim.fused": "null", "engine.compile": False,  # a timed case is fixed, never measured again
            **(extra or {})}
    from .methods.configs import section_class

    fields = {f.name for f in dataclasses.fields(section_class(method))}
    over.update({f"method.{k}": v for k, v in (method_fields or {}).items() if k in fields and v is not None})
    return load_config(None, [f"{k}={_yaml_value(v)}" for k, v in over.items()])  # typed and validated there


def _yaml_value(v) -> str:
    import json

    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


def synthetic_batch(views, batch: int, img_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A Batch like a loader's for a method's declared views (None: one view at img_size), random pixels."""
    from pipelines.base import Batch, sample_seeds

    g = torch.Generator().manual_seed(seed)
    sizes = [v.size or img_size for v in views] if views else [img_size]
    imgs = [torch.randn(batch, 3, s, s, generator=g).to(device=device, dtype=dtype) for s in sizes]
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return Batch(imgs[0], labels, sample_seeds(0, 0, range(batch)).to(device), more_views=imgs[1:])


# `bench model --ablate`: the four switches of the step policy (engine/policy.py), every one off, each on alone,
# all on, then the rest of the 16 combinations, so that the fastest is found, not assumed
ABLATION_BASE = {"model.attn_impl": "math", "optim.fused": False, "engine.precision": "fp32", "engine.compile": False}
_SWITCHES = (("model.attn_impl", "sdpa", "SDPA"), ("optim.fused", True, "fused AdamW"),
             ("engine.precision", "bf16", "bf16"), ("engine.compile", True, "compile"))


def ablation_cases() -> List[Tuple[str, Dict]]:
    """(label, overrides) for every combination of the four switches: none, each alone, all on, then the rest."""
    import itertools

    combos = sorted(itertools.product((False, True), repeat=len(_SWITCHES)),
                    key=lambda on: (sum(on) not in (0, 1, len(on)), sum(on) == len(on), sum(on), [not x for x in on]))
    out = []
    for on in combos:
        names = [name for (_, _, name), x in zip(_SWITCHES, on) if x]
        label = "none (fp32, math, foreach, eager)" if not names else (
            "all on" if len(names) == len(on) else ("+ " if len(names) == 1 else "") + " + ".join(names))
        out.append((label, {key: value for (key, value, _), x in zip(_SWITCHES, on) if x}))
    return out


ABLATION = tuple(ablation_cases())


def ablation_summary(rows: List[Dict], device: torch.device) -> Dict:
    """The fastest combination, today's default (engine/policy.py's fallback: what `auto` ran before it measured)
    and what `auto` picks from these rates for a long run (the fastest eager combination and its near-ties,
    compiled where that is faster, as decide_compile), each with its ratio to none."""
    from .engine.policy import Combo, choose, fallback, near_ties

    def combo(r):
        return Combo(r["precision"], r["attn"], bool(r["fused_adamw"]))

    none = rows[0]
    eager = [r for r in rows if not r["compile"]]
    order = [combo(r) for r in eager]
    default = next(r for r in eager if combo(r) == fallback(order, device))
    rates = {combo(r): r["img_per_s"] for r in eager}
    pick = next(r for r in eager if combo(r) == choose(rates, order))
    near = near_ties(rates, order, combo(pick))  # as decide_compile: the near-ties' compiled rows decide
    compiled = [r for r in rows if r["compile"] and combo(r) in near]
    fastest = max(compiled, key=lambda r: r["img_per_s"], default=None)
    auto = fastest if fastest and fastest["img_per_s"] > pick["img_per_s"] else pick
    best = max(rows, key=lambda r: r["img_per_s"])

    def entry(r):
        return {"case": r["name"], "img_per_s": r["img_per_s"], "vs_none": round(r["img_per_s"] / none["img_per_s"], 3),
                "vs_default": round(r["img_per_s"] / default["img_per_s"], 3)}

    return {"best": entry(best), "default": entry(default), "auto": entry(auto)}


def policy_cases(model: str, batch: int, img_size: int, patch_size: int, method: str, device: str,
                 method_fields: Optional[Dict] = None, total_steps: int = 500_000) -> Tuple[List[Tuple[str, Dict]], object]:
    """`bench model --policy`: the step `auto` resolves to for a run of `total_steps` optimizer steps (through
    engine/policy.py itself: measured, or from its cache), beside the default before it measured (its fallback
    for this device), as two cases; and the policy, with its figures."""
    from .distributed.env import pick_device
    from .engine.policy import candidates, decide_compile, fallback, resolve_step_policy

    dev = pick_device(device)
    cfg = _engine_config(model, batch, img_size, patch_size, "auto", dev.type, "torch", "auto", method, method_fields,
                         {"optim.fused": "auto", "engine.compile": "auto"})
    pol = decide_compile(resolve_step_policy(cfg, dev), cfg, dev, total_steps)
    old = fallback(candidates("auto", "auto", None, dev), dev)
    return [("default before (fallback, eager)", {**old.overrides(), "engine.compile": False}),
            (f"auto ({pol.source})", {"engine.precision": pol.precision, "model.attn_impl": pol.attn_impl,
                                      "optim.fused": pol.fused, "engine.compile": bool(pol.compile)})], pol


def _engine_step(engine, batch) -> Callable[[], None]:
    """The loop's own calls, nothing else."""

    def step() -> None:
        out = engine(batch)
        engine.backward(out["loss"])
        if engine.step():
            engine.after_step()

    return step


def bench_model(
    model: str = "mae_vit_tiny_patch16",
    batch: int = 64,
    img_size: int = 224,
    patch_size: int = 16,
    precision: str = "auto",
    attn: Sequence[str] = ("sdpa", "math"),
    steps: int = 10,
    warmup: int = 3,
    device: str = "auto",
    mask_ratio: Optional[float] = None,
    timm_reference: Optional[str] = "vit_tiny_patch16_224",
    progress: Optional[Callable] = None,
    engines: Sequence[str] = ("torch",),
    variants: Sequence = (),
    teacher: Optional[str] = None,
    methods: Sequence[str] = ("mae",),
    method_settings: Optional[Dict] = None,
) -> Dict:
    """One row per (method, engine, attention implementation): real train steps of `model` through the engine
    the loop uses (engine(batch); engine.backward(loss); engine.step(); after_step), on a synthetic batch of the
    views the method declares, already on the device; plus timm's full-token classification train step when
    `timm_reference` names a timm model (12 heads, as mae-lite's Tiny). A method with a frozen teacher gets a
    randomly initialised one (`teacher` names its encoder; its weights do not change its speed). Every row carries
    its MFU against its own FLOP count. `method_settings` ({"decoder_block": 1}) apply to the methods whose section
    has them."""
    from .distributed.env import init_distributed, pick_device, resolve_precision, shutdown_distributed
    from .engine.plan import DTYPES, bench_plan
    from .engines import engine_class
    from .flops import mfu, peak_flops, train_flops_per_image
    from .methods import build_method

    dev = pick_device(device)
    precision = resolve_precision(precision, dev)
    own_group = any(engine_class(k).needs_process_group for k in engines) and not torch.distributed.is_initialized()
    if own_group:
        init_distributed(dev.type, group_of_one=True)
    torch.manual_seed(0)
    fields = {"mask_ratio": mask_ratio, "teacher": "random", "teacher_model": teacher, **(method_settings or {})}
    _check_settings(methods, method_settings or {}, teacher)
    # (label, method, engine, attn, config overrides) per row; --ablate: the variants on the first engine and method
    cases = [(_label(model, m, mask_ratio, teacher), m, kind, impl, {}) for kind in engines for impl in attn
             for m in methods]
    if variants:
        cases = [(label, methods[0], engines[0], over.get("model.attn_impl", ABLATION_BASE["model.attn_impl"]),
                  {**ABLATION_BASE, **over}) for label, over in variants]
    built, flops, ref_images = [], None, None  # every case is built first, then all are timed round-robin (below)
    try:
        for label, name, kind, impl, extra in cases:
            cfg = _engine_config(model, batch, img_size, patch_size, precision, dev.type, kind, impl, name, fields, extra)
            plan = bench_plan(cfg, _single_env(dev))
            method = build_method(cfg.method, cfg.model, plan)
            data = synthetic_batch(method.views(), batch, img_size, DTYPES[plan.precision], dev)
            ref_images = data.images if ref_images is None else ref_images
            case_flops = train_flops_per_image(method, data)
            flops = flops or case_flops
            engine = engine_class(kind)(method, plan, cfg.engine, cfg.optim)
            meta = {"engine": kind, "precision": engine.precision, "compile": plan.compile,
                    "fused_adamw": bool(engine.optimizer.defaults.get("fused")), "method": cfg.method.name,
                    "views": len(data.views), "flops": case_flops}
            built.append((label, impl, meta, _engine_step(engine, data)))
        if timm_reference:
            import timm

            images = ref_images.float()
            labels = torch.randint(0, 1000, (batch,), device=dev)
            ref = timm.create_model(timm_reference, num_heads=12, num_classes=1000, img_size=img_size,
                                    patch_size=patch_size).to(dev).train()  # the same tokens as ours
            ce = nn.CrossEntropyLoss()
            step = _train_step(ref, lambda: ce(ref(images), labels), precision, dev)
            built.append((f"timm {timm_reference} (12 heads, all tokens)", "timm default", {"engine": "plain loop"}, step))
        all_times = time_round_robin([step for *_, step in built], dev, steps, warmup, progress)
        rows = [{**_row(label, impl, batch, times), **meta} for (label, impl, meta, _), times in zip(built, all_times)]
    finally:
        del built
        if own_group:
            shutdown_distributed()
    peaks = {p: peak_flops(dev, p) for p in {r["precision"] for r in rows if "precision" in r} | {precision}}
    peak = peaks[precision]
    ours = [r for r in rows if not r["name"].startswith("timm")]
    for r in ours:  # each against the peak of the dtype it ran in, and its own FLOPs (a teacher adds some)
        case_flops = r.pop("flops")
        r["mfu"] = mfu(r["img_per_s"], case_flops, peaks[r["precision"]]["flops"])
        r["gflops_per_image"] = round(case_flops / 1e9, 4) if case_flops else None
    primary = max(ours, key=lambda r: r["img_per_s"], default=rows[0])
    ref_rate = rows[-1]["img_per_s"] if timm_reference else None
    for r in rows:
        r["ratio_vs_timm"] = round(r["img_per_s"] / ref_rate, 3) if ref_rate else None
    for r in ours:  # side by side: against the first row with the same engine and attention (ablation: the first row)
        base = ours[0] if variants else next(x for x in ours if (x["attn"], x["engine"]) == (r["attn"], r["engine"]))
        r["ratio_vs_first"] = round(r["img_per_s"] / base["img_per_s"], 3)
    summary = ablation_summary(ours, dev) if variants and len(variants) == len(ABLATION) else None
    return {
        "model": model,
        "methods": list(methods),
        "ablation": summary,
        "batch": batch,
        "img_per_s": primary["img_per_s"],
        "best_attn": primary["attn"],
        "best_engine": primary.get("engine"),
        "precision": precision,
        "img_size": img_size,
        "steps": steps,
        "warmup": warmup,
        "train_gflops_per_image": round(flops / 1e9, 4) if flops else None,
        "peak": {"tflops": round(peak["flops"] / 1e12, 3) if peak["flops"] else None, "source": peak["source"]},
        "runs": rows,
        "env": environment(dev),
    }


def _check_settings(methods: Sequence[str], settings: Dict, teacher: Optional[str]) -> None:
    """A setting none of the timed methods has is an error (a typo would otherwise vanish); a teacher with no
    method to distil it is a warning."""
    import warnings

    from .config import ConfigError
    from .methods.configs import section_class

    owned = {f.name for m in methods for f in dataclasses.fields(section_class(m))}
    unknown = sorted(set(settings) - owned)
    if unknown:
        raise ConfigError(f"method settings {', '.join(unknown)}: none of the methods {', '.join(methods)} has them "
                          f"(their settings: {', '.join(sorted(owned - {'name'}))})")
    if teacher and "teacher" not in owned:
        warnings.warn(f"--teacher {teacher} has no effect: none of the methods {', '.join(methods)} distils a teacher "
                      "(add --method dmae,d2mae)", stacklevel=3)


def _label(model: str, method: str, mask_ratio: Optional[float], teacher: Optional[str]) -> str:
    from .methods.configs import section_class

    section = section_class(method)()
    parts = [method]
    if hasattr(section, "mask_ratio"):  # None: the method's own (MAE 0.75, SimMIM 0.6)
        parts.append(f"mask {section.mask_ratio if mask_ratio is None else mask_ratio}")
    if hasattr(section, "teacher"):
        parts.append(f"random teacher {(teacher or section.teacher_model).removeprefix('mae_')}")
    return f"{model} ({', '.join(parts)})"


def _single_env(dev: torch.device):
    from .distributed.env import DistEnv

    return DistEnv(0, 1, 0, dev)


def _row(name: str, attn: str, batch: int, times: List[float]) -> Dict:
    med = statistics.median(times)
    return {
        "name": name,
        "attn": attn,
        "img_per_s": round(batch / med, 2),
        "step_ms_median": round(med * 1000, 2),
        "step_ms_min": round(min(times) * 1000, 2),
        "step_ms_max": round(max(times) * 1000, 2),
    }


def environment(device: torch.device) -> Dict:
    import timm

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
    for lib in ("deepspeed", "nvidia.dali", "ffcv"):
        try:
            from importlib.metadata import version

            info[lib.split(".")[-1]] = version({"nvidia.dali": "nvidia-dali-cuda130"}.get(lib, lib))
        except Exception:  # not installed: nothing to report
            pass
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _cycle(loader):
    """Batches across epoch boundaries (a short data set must not end a benchmark)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _windows(fn: Callable[[], int], device: torch.device, windows: int, steps: int, warmup: int,
             progress: Optional[Callable] = None) -> List[float]:
    """img/s of `windows` windows of `steps` calls of `fn` (which returns the images it handled), after
    `warmup` calls. A window's rate (images / elapsed) rather than a median step: loaders deliver in bursts."""
    for _ in range(warmup):
        fn()
    _sync(device)
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        for _ in range(steps):
            n += fn()
            if progress:
                progress()
        _sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def _loader_step(engine, batches) -> Callable[[], int]:
    """One real training step on the loader's next batch; returns its image count."""

    def step() -> int:
        b = next(batches)
        _engine_step(engine, b)()
        return len(b)

    return step


def _beside_baseline(cfg, env, engine, batches, fixed, windows: int, steps: int, warmup: int, progress=None) -> Dict:
    """The same recipe as the method's baseline (D-MAE's: MAE, no teacher, no adapter), timed in the same process:
    model-only and end-to-end windows alternate with this method's, so the ratio is side by side."""
    import dataclasses

    from .engines import engine_class
    from .methods import build_method
    from .methods.configs import switch_section

    base_section = switch_section(cfg.method, type(cfg.method).baseline, drop=True)
    base_engine = engine_class(cfg.engine.kind)(build_method(base_section, cfg.model, engine.plan), engine.plan,
                                                cfg.engine, cfg.optim)
    micro, dev = cfg.train.micro_batch, env.device
    res: Dict[str, Dict[str, List[float]]] = {"model": {"with": [], "without": []}, "e2e": {"with": [], "without": []}}
    for w in range(windows):  # with / without, window by window
        for which, eng in (("with", engine), ("without", base_engine)):
            fixed_step = _engine_step(eng, fixed)
            res["model"][which] += _windows(lambda: (fixed_step(), micro)[1], dev, 1, steps, warmup if w == 0 else 1,
                                            progress)
            res["e2e"][which] += _windows(_loader_step(eng, batches), dev, 1, steps, warmup if w == 0 else 1, progress)
    world = env.world_size
    out = {"baseline": base_section.name}
    for name in ("model", "e2e"):
        per_rank = statistics.median(res[name]["without"])
        out[name] = {"img_per_s": round(per_rank * world, 1), "img_per_s_per_rank": round(per_rank, 1),
                     "windows_img_per_s": [round(r, 1) for r in res[name]["without"]],
                     "with_teacher_windows_img_per_s": [round(r, 1) for r in res[name]["with"]],
                     "with_teacher_vs_without": round(statistics.median(res[name]["with"]) / per_rank, 3)}
    return out


def bench_e2e(cfg, steps: int = 20, warmup: int = 5, windows: int = 3, progress: Optional[Callable] = None) -> Dict:
    """End-to-end img/s of real training steps with the recipe's loader, engine and method, beside the
    loader alone and the model alone (one batch reused), measured in the same process one after another,
    with MFU for the model-only and end-to-end rates. Under torchrun, each rank measures its own; the
    reported global rates are per-rank x world size."""
    from .distributed.env import shutdown_distributed
    from .engines import init_for
    from .engine.loop import build_training, seed_everything
    from .flops import mfu, peak_flops, train_flops_per_image

    env = init_for(cfg.engine)
    try:
        seed_everything(cfg.train.seed + env.rank)
        loader, method, engine, _ = build_training(cfg, env)
        dev, micro = env.device, cfg.train.micro_batch
        batches = _cycle(loader)
        loader_rates = _windows(lambda: len(next(batches)), dev, windows, steps, warmup, progress)
        fixed = next(batches)
        flops = train_flops_per_image(method, fixed)
        step = _engine_step(engine, fixed)
        model_rates = _windows(lambda: (step(), micro)[1], dev, windows, steps, warmup, progress)

        e2e_rates = _windows(_loader_step(engine, batches), dev, windows, steps, warmup, progress)
        without = _beside_baseline(cfg, env, engine, batches, fixed, windows, steps, warmup, progress) \
            if type(cfg.method).baseline else None
        peak = peak_flops(dev, engine.precision)
        world = env.world_size
        out = {}
        for name, rates in (("loader", loader_rates), ("model", model_rates), ("e2e", e2e_rates)):
            per_rank = statistics.median(rates)
            out[name] = {"img_per_s": round(per_rank * world, 1), "img_per_s_per_rank": round(per_rank, 1),
                         "windows_img_per_s": [round(r, 1) for r in rates]}
        for name in ("model", "e2e"):
            out[name]["mfu"] = mfu(out[name]["img_per_s_per_rank"], flops, peak["flops"])
        out["e2e"]["vs_model"] = round(out["e2e"]["img_per_s"] / out["model"]["img_per_s"], 3)
        out["e2e"]["vs_loader"] = round(out["e2e"]["img_per_s"] / out["loader"]["img_per_s"], 3)
        if without is not None:
            out["without_teacher"] = without
            for name in ("model", "e2e"):
                out[name]["vs_without_teacher"] = without[name]["with_teacher_vs_without"]  # alternating windows
        return {
            **out,
            "method": cfg.method.name,
            "bound_by": "loader" if out["loader"]["img_per_s"] < out["model"]["img_per_s"] else "model",
            "train_gflops_per_image": round(flops / 1e9, 4),
            "peak": {"tflops": round(peak["flops"] / 1e12, 3) if peak["flops"] else None, "source": peak["source"]},
            "engine": cfg.engine.kind,
            "precision": engine.precision,
            "backend": cfg.data.backend,
            "data": cfg.data.path,
            "workers": cfg.data.workers,
            "micro_batch": micro,
            "world_size": world,
            "steps": steps,
            "warmup": warmup,
            "windows": windows,
            "is_main": env.is_main,
            "env": environment(dev),
        }
    finally:
        shutdown_distributed()
