"""The `auto` step policy: which precision, attention kernel, AdamW implementation and torch.compile a run uses,
chosen from measurement of this run's model step on this device, never from a rule of thumb about the device.

- `engine.precision`, `model.attn_impl` and `optim.fused` set to `auto` are resolved together: every combination
  of the automatic switches (the fixed ones as given) is timed for a few real train steps (the run's method and
  model, its micro-batch, synthetic images, the torch engine), in turns, and the fastest is kept. Measuring the
  combinations, not each switch alone, matters: on a CPU with avx512_bf16 bf16 alone is 1.9x and SDPA alone
  1.05x, but the two together lose both gains (SDPA's bf16 backward is slow there).
- `engine.compile: auto` is decided once the schedule's length is known (`decide_compile`): the chosen step is
  timed eager and compiled, and compile is on when the time it saves over the whole run repays its compile time
  twice (COMPILE_PAYBACK; the margin covers the recompiles of evaluation and of a last partial batch).
- Results are cached (`policy_cache_dir()`/policy.json) under a key of the device (CPU model and the flags that
  change kernels, or the GPU's name), torch's version, the method, model shape and micro-batch, so only a run's
  first start on a machine pays for the probe (about 30 steps; a compile probe adds one compilation).
- `FASTVIT_PROBE=0` turns measurement off (the tests set it, so that a run is a function of its config): `auto`
  then takes the cached figures when present, else the fallback below, and says so.

`choose` and `compile_pays` are pure functions of the figures, so a given probe result always resolves the same.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

COMPILE_PAYBACK = 2.0
"""torch.compile is on when (eager - compiled step time) x optimizer steps >= COMPILE_PAYBACK x compile time."""
MIN_COMPILE_S = 30.0
"""What a cold compilation of a train step is assumed to cost before it is measured (15-50 s measured on 2 CPU
cores: MAE-Tiny 224 px, the Fashion-MNIST demo, D-MAE with a ViT-Base teacher); with compile saving at most half
a step, a run shorter than 2 x COMPILE_PAYBACK x MIN_COMPILE_S eager is not worth measuring."""
PROBE_STEPS, PROBE_WARMUP = 3, 1
NEAR_TIE = 0.05
"""Eager combinations within this fraction of the fastest (same precision) are all timed compiled: compile
changes their order (fused AdamW ties eager on a CPU and wins compiled)."""
# CPU flags that change which kernels run (bf16 / fp16 / AMX paths); the rest do not enter the cache key
_KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")


@dataclass(frozen=True)
class Combo:
    precision: str
    attn_impl: str
    fused: bool

    @property
    def label(self) -> str:
        return f"{self.precision} + {self.attn_impl} attention + {'fused' if self.fused else 'foreach'} AdamW"

    def overrides(self) -> Dict:
        return {"engine.precision": self.precision, "model.attn_impl": self.attn_impl, "optim.fused": self.fused}


@dataclass
class StepPolicy:
    precision: str
    attn_impl: str
    fused: bool
    compile: Optional[bool] = None
    """None until `decide_compile` (it needs the schedule's length)."""
    source: str = "fixed"
    """fixed (nothing was auto), probe, cache or fallback (FASTVIT_PROBE=0 and no cached figures)."""
    rates: Dict[str, float] = field(default_factory=dict)
    """img/s per timed combination (label -> rate)."""
    near: List[Combo] = field(default_factory=list)
    """The chosen combination and those within NEAR_TIE of it at its precision: compile's candidates."""
    notes: List[str] = field(default_factory=list)

    def describe(self) -> List[str]:
        """Lines for the run's log and `--dry-run`: what was chosen, and the figures behind it."""
        out = [f"step policy     {self.precision}, {self.attn_impl} attention, "
               f"{'fused' if self.fused else 'foreach'} AdamW, compile {'on' if self.compile else 'off'} ({self.source})"]
        for label, rate in sorted(self.rates.items(), key=lambda kv: -kv[1]):
            out.append(f"                {rate:8.1f} img/s  {label}")
        out += [f"                {n}" for n in self.notes]
        return out


def candidates(precision: str, attn_impl: str, fused, device: torch.device) -> List[Combo]:
    """Every combination of the automatic switches, the fixed ones as given, in a fixed order (ties go to the
    first). fp16 is never chosen automatically (it needs loss scaling) and needs CUDA."""
    precs = ["bf16", "fp32"] if precision == "auto" else [precision]
    attns = ["sdpa", "math"] if attn_impl == "auto" else [attn_impl]
    fuseds = [True, False] if fused == "auto" else [_fused_default(fused, device)]
    return [Combo(p, a, f) for p, a, f in itertools.product(precs, attns, fuseds)]


def _fused_default(fused, device: torch.device) -> bool:
    return device.type == "cuda" if fused is None else bool(fused)


def choose(rates: Dict[Combo, float], order: Sequence[Combo]) -> Combo:
    """The fastest combination; equal rates go to the earlier one in `order`."""
    return max(order, key=lambda c: (rates.get(c, float("-inf")), -order.index(c)))


def near_ties(rates: Dict[Combo, float], order: Sequence[Combo], best: Combo, limit: int = 3) -> List[Combo]:
    """`best` and the combinations of its precision within NEAR_TIE of its rate, fastest first (at most `limit`)."""
    close = [c for c in order if c.precision == best.precision and c != best and c in rates
             and rates[c] >= (1 - NEAR_TIE) * rates[best]]
    return [best] + sorted(close, key=lambda c: (-rates[c], order.index(c)))[:limit - 1]


def compile_pays(total_steps: int, eager_s: float, compiled_s: float, compile_s: float) -> bool:
    return (eager_s - compiled_s) * total_steps >= COMPILE_PAYBACK * compile_s


def fallback(combos: Sequence[Combo], device: torch.device) -> Combo:
    """Without figures: the combination benchmarks/results/cpu_model.md and cpu_ablation.json measured fastest
    for this kind of device, among the candidates (bf16 where it is native, math attention under bf16 on a CPU,
    SDPA elsewhere; fused AdamW on CUDA)."""
    from ..distributed.env import resolve_precision

    native = resolve_precision("auto", device) == "bf16"  # bf16 on CUDA and on CPUs with native bf16

    def rank(c: Combo) -> Tuple:
        prec_ok = (c.precision == "bf16") == native
        attn_ok = (c.attn_impl == "math") == (device.type == "cpu" and c.precision == "bf16")
        return (prec_ok, attn_ok, c.fused == (device.type == "cuda"))

    return max(combos, key=lambda c: (rank(c), -list(combos).index(c)))


# --- the cache -------------------------------------------------------------------------------------------------

def policy_cache_dir() -> Path:
    return Path(os.environ.get("FASTVIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                             Path.home() / ".cache") / "fastvit_pt")


def device_key(device: torch.device) -> Dict:
    if device.type == "cuda":
        try:
            name = torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError):  # a plan for CUDA made where there is none (a config check)
            name = "unavailable"
        return {"device": name, "cuda": torch.version.cuda}
    from ..bench import _cpu_name

    flags: List[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = sorted(set(line.split(":", 1)[1].split()) & set(_KERNEL_FLAGS))
                    break
    except OSError:
        pass
    return {"device": _cpu_name(), "flags": flags, "threads": torch.get_num_threads()}


def policy_key(cfg, device: torch.device, combos: Sequence[Combo]) -> Dict:
    m = cfg.model
    return {**device_key(device), "torch": torch.__version__, "method": cfg.method.name, "model": m.name,
            "img_size": m.img_size, "patch_size": m.patch_size, "micro_batch": cfg.train.micro_batch,
            "views": [getattr(v, "size", None) for v in (cfg.method.views() or [])],
            "candidates": [c.label for c in combos]}


def _digest(key: Dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_get(key: Dict) -> Optional[Dict]:
    path = policy_cache_dir() / "policy.json"
    try:
        return json.loads(path.read_text()).get(_digest(key))
    except (OSError, ValueError):
        return None


def cache_put(key: Dict, entry: Dict) -> None:
    path = policy_cache_dir() / "policy.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        old = table.get(_digest(key), {})
        table[_digest(key)] = {**old, **entry, "key": key}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:  # a read-only home is no reason to fail a run; the next start measures again
        pass


def probing_enabled() -> bool:
    return os.environ.get("FASTVIT_PROBE", "1") not in ("0", "false", "no", "off")


# --- measurement -----------------------------------------------------------------------------------------------

def _probe_cfg(cfg, combo: Combo, compile_: bool):
    c = copy.deepcopy(cfg)
    c.engine.kind, c.engine.compile = "torch", compile_
    c.engine.precision, c.model.attn_impl, c.optim.fused = combo.precision, combo.attn_impl, combo.fused
    c.train.global_batch = c.train.micro_batch  # one micro-step per optimizer step, on one rank
    return c


def _build_step(cfg, device: torch.device):
    """The loop's own step (engine(batch); backward; step; after_step) for `cfg` on synthetic images."""
    from ..bench import _engine_step, _single_env, synthetic_batch
    from ..engines import engine_class
    from ..methods import build_method
    from .plan import bench_plan

    plan = bench_plan(cfg, _single_env(device))
    method = build_method(cfg.method, cfg.model, plan)
    data = synthetic_batch(method.views(), cfg.train.micro_batch, cfg.model.img_size, plan.dtype, device)
    engine = engine_class("torch")(method, plan, cfg.engine, cfg.optim)
    return _engine_step(engine, data)


def measure(cfg, device: torch.device, combos: Sequence[Combo], steps: int = PROBE_STEPS,
            warmup: int = PROBE_WARMUP) -> Dict[Combo, float]:
    """img/s of each combination's train step, timed in turns after a warm-up (bench.time_round_robin)."""
    from ..bench import time_round_robin
    from ..methods.base import local_only

    # local_only: rank 0 measures alone while the others wait for its choice; a method's collectives (MoCo-v3's
    # all-gather, DINO's centre) must not wait for them
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), local_only():
        fns = [_build_step(_probe_cfg(cfg, c, False), device) for c in combos]
        times = time_round_robin(fns, device, steps, warmup)
    del fns
    return {c: round(cfg.train.micro_batch / statistics.median(t), 2) for c, t in zip(combos, times)}


def measure_compile(cfg, device: torch.device, combo: Combo, steps: int = PROBE_STEPS) -> Dict[str, float]:
    """Seconds per step eager and compiled, and the compile time (the compiled step's first call, less a step)."""
    from ..bench import _sync, time_round_robin
    from ..methods.base import local_only

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), local_only():
        eager = _build_step(_probe_cfg(cfg, combo, False), device)
        compiled = _build_step(_probe_cfg(cfg, combo, True), device)
        t0 = time.perf_counter()
        compiled()
        compiled()  # the backward graph and the optimizer's first step compile on the first calls
        _sync(device)
        first = time.perf_counter() - t0
        t_eager, t_comp = (statistics.median(t) for t in time_round_robin([eager, compiled], device, steps, 1))
    # the probe's compiled code was traced alone (local_only) on its own modules: the run must trace its own
    torch._dynamo.reset()
    return {"eager_s": t_eager, "compiled_s": t_comp, "compile_s": max(0.0, first - 2 * t_comp)}


# --- resolution ------------------------------------------------------------------------------------------------

def resolve_step_policy(cfg, device: torch.device, is_main: bool = True) -> StepPolicy:
    """precision, attention and AdamW for `cfg` on `device` (compile: `decide_compile`, later)."""
    e, m = cfg.engine, cfg.model
    fused = cfg.optim.fused
    combos = candidates(e.precision, m.attn_impl, fused, device)
    if device.type != "cuda":
        combos = [c for c in combos if c.precision != "fp16"]
    if len(combos) == 1:
        c = combos[0]
        return StepPolicy(c.precision, c.attn_impl, c.fused, source="fixed")
    key = policy_key(cfg, device, combos)
    cached = cache_get(key)
    if cached and "rates" in cached:
        rates = {c: cached["rates"][c.label] for c in combos if c.label in cached["rates"]}
        source = "cache"
    elif probing_enabled():
        if is_main:
            print(f"step policy: timing {len(combos)} combinations of {cfg.model.name} ({cfg.method.name}) at "
                  f"micro-batch {cfg.train.micro_batch} on {device} (cached for the next run)", flush=True)
        rates = measure(cfg, device, combos)
        cache_put(key, {"rates": {c.label: r for c, r in rates.items()}})
        source = "probe"
    else:
        c = fallback(combos, device)
        return StepPolicy(c.precision, c.attn_impl, c.fused, source="fallback",
                          notes=["FASTVIT_PROBE=0 and nothing cached: the fallback for this kind of device"])
    best = choose(rates, combos)
    return StepPolicy(best.precision, best.attn_impl, best.fused, source=source,
                      rates={c.label: r for c, r in rates.items()}, near=near_ties(rates, combos, best))


def decide_compile(policy: StepPolicy, cfg, device: torch.device, total_steps: int) -> StepPolicy:
    """engine.compile: true / false as given; auto by `compile_pays` on measured figures (cached with the step
    policy's). A run too short to repay even a fast compilation is not measured at all."""
    setting = cfg.engine.compile
    if setting != "auto":
        policy.compile = bool(setting)
        return policy
    rate = max(policy.rates.values(), default=None)
    if rate is None and probing_enabled():  # every other switch was fixed: a short eager timing bounds the run
        one = Combo(policy.precision, policy.attn_impl, policy.fused)
        key = policy_key(cfg, device, [one])
        cached = cache_get(key)
        if cached and one.label in cached.get("rates", {}):
            rate = cached["rates"][one.label]
        else:
            rate = measure(cfg, device, [one])[one]
            cache_put(key, {"rates": {one.label: rate}})
    if rate is not None:  # the run's eager time bounds what compile could save (at most all of it)
        eager_total = total_steps * cfg.train.global_batch / rate
        if 0.5 * eager_total < COMPILE_PAYBACK * MIN_COMPILE_S:
            policy.compile = False
            policy.notes.append(f"compile off: the whole run is ~{eager_total:.0f} s eager, too short to repay a "
                                f"compilation")
            return policy
    figures: Dict[Combo, Dict[str, float]] = {}
    how = "cached"
    for combo in policy.near or [Combo(policy.precision, policy.attn_impl, policy.fused)]:
        key = {**policy_key(cfg, device, [combo]), "compile": True}
        cached = cache_get(key)
        if cached and "compile" in cached:
            figures[combo] = cached["compile"]
        elif probing_enabled():
            figures[combo], how = measure_compile(cfg, device, combo), "measured"
            cache_put(key, {"compile": figures[combo]})
    if not figures:
        policy.compile = False
        policy.notes.append("compile off: not measured (FASTVIT_PROBE=0, nothing cached)")
        return policy
    combo = min(figures, key=lambda c: (figures[c]["compiled_s"], list(figures).index(c)))
    fig = figures[combo]
    # the cold compile: a near-tie measured after another one finds most of its graph in inductor's cache
    cold = max(f["compile_s"] for f in figures.values())
    steps_total = total_steps * max(1, cfg.train.global_batch // max(1, cfg.train.micro_batch))
    policy.compile = compile_pays(steps_total, fig["eager_s"], fig["compiled_s"], cold)
    if policy.compile:  # the near-tie that compiles best (same precision: the loader's dtype is already set)
        policy.attn_impl, policy.fused = combo.attn_impl, combo.fused
    for c, f in figures.items():
        policy.notes.append(f"{c.label}: {f['eager_s'] * 1e3:.0f} ms eager, {f['compiled_s'] * 1e3:.0f} ms compiled "
                            f"per micro-step, {f['compile_s']:.0f} s to compile ({how})")
    policy.notes.append(
        f"compile {'on' if policy.compile else 'off'}: {steps_total} micro-steps save "
        f"{(fig['eager_s'] - fig['compiled_s']) * steps_total:.0f} s against {cold:.0f} s of compilation "
        f"(on when >= {COMPILE_PAYBACK:g}x)")
    return policy
