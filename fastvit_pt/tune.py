"""`fastvit tune RECIPE`: measure the recipe's input pipeline over its knobs and write RECIPE.tuned.yaml.

The loader is built exactly as training builds it (the recipe's data section, micro-batch, crop size, device
and compute dtype), on one rank; with --ranks-per-node N the process is pinned to its 1/N share of the cores,
as one of N ranks on the node would be. Knobs are tuned one at a time (coordinate descent, each from the best
so far): data.workers, data.prefetch_factor, then the backend's own (ffcv: ffcv_os_cache; dali on a GPU:
dali_hw_decoder_load); within 3% of the fastest is a tie, won by the cheapest value. Each setting: a fresh loader, untimed warm-up batches (workers, threads, caches, DALI's
build), then batches timed for its share of the budget. The tuned recipe is `base:` the recipe plus the
chosen values (and any KEY=VALUE given here), with the measured table in its comments.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

WARMUP_BATCHES = 3


def _candidates(backend: str, cores: int, gpu: bool, current) -> List[Tuple[str, list]]:
    # ffcv decodes in numba threads, at most one per core; the others may oversubscribe (I/O, the GIL's gaps)
    most = cores if backend == "ffcv" else 2 * cores
    workers = sorted({w for w in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, current.workers) if w <= most} or {1})
    knobs = [("workers", workers), ("prefetch_factor", sorted({1, 2, 4, current.prefetch_factor}))]
    if backend == "ffcv":
        knobs.append(("ffcv_os_cache", [True, False]))
    if backend == "dali" and gpu:
        knobs.append(("dali_hw_decoder_load", sorted({0.0, 0.35, 0.65, 0.9, current.dali_hw_decoder_load})))
    return knobs


def _measure(build: Callable, seconds: float, device) -> float:
    """img/s of a freshly built loader over `seconds`, after WARMUP_BATCHES untimed batches (epochs wrap)."""
    import torch

    loader = build()
    epoch, n, t0, seen = 0, 0, None, 0
    while True:
        loader.set_epoch(epoch)
        for b in loader:
            seen += 1
            if seen == WARMUP_BATCHES:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                continue
            if t0 is None:
                continue
            n += len(b)
            if time.perf_counter() - t0 >= seconds:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return n / (time.perf_counter() - t0)
        if seen == 0:
            raise ValueError("tune: the loader yields no batch; lower train.micro_batch or add data")
        epoch += 1


def tune(recipe: str, overrides: Sequence[str] = (), budget_s: float = 300.0, ranks_per_node: int = 1,
         out: Optional[str] = None, progress: Optional[Callable] = None) -> Dict:
    import pipelines

    from .config import load_config
    from .engine.plan import DTYPES
    from .distributed.env import pick_device, resolve_precision

    cfg = load_config(recipe, list(overrides))
    cfg.check_paths()
    # the cores this process may use (a job scheduler's share, not the machine's count)
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = len(allowed)
    if ranks_per_node > 1 and hasattr(os, "sched_setaffinity"):
        import torch

        share = allowed[: max(1, cores // ranks_per_node)]
        os.sched_setaffinity(0, share)
        cores = len(share)
        torch.set_num_threads(cores)
    device = pick_device(cfg.engine.device)
    precision = resolve_precision(cfg.engine.precision, device)
    knobs = _candidates(cfg.data.backend, cores, device.type == "cuda", cfg.data)
    trials = sum(len(values) for _, values in knobs)
    seconds = max(1.0, budget_s / trials)
    best = {name: getattr(cfg.data, name) for name, _ in knobs}
    table: List[Dict] = []

    def build(setting: Dict):
        data = dataclasses.replace(cfg.data, **setting)
        return pipelines.build_loader(data, img_size=cfg.model.img_size, batch_size=cfg.train.micro_batch, seed=0,
                                      device=device, dtype=DTYPES[precision], train=True, views=cfg.method.views())

    done = 0
    for name, values in knobs:
        rates = {}
        for value in values:
            setting = {**best, name: value}
            rate = _measure(lambda: build(setting), seconds, device)
            rates[value] = rate
            table.append({"knob": name, "value": value, **{k: v for k, v in setting.items() if k != name},
                          "img_per_s": round(rate, 1)})
            done += 1
            if progress:
                progress(done, trials, f"data.{name}={value}: {rate:.0f} img/s")
        # within 3% of the fastest counts as a tie (run-to-run noise is larger), and a tie goes to the cheapest
        # value (candidates are in ascending order: fewer threads, fewer batches in memory)
        top = max(rates.values())
        best[name] = next(v for v in values if rates[v] >= 0.97 * top)
    chosen = dict(best)
    final = round(rates[best[knobs[-1][0]]], 1)  # the last knob's trials ran with every other knob at its best
    # the recipe as written, where its workers were a candidate (ffcv caps them at the core count)
    start = next((r["img_per_s"] for r in table if r["knob"] == "workers" and r["value"] == cfg.data.workers), None)
    path = Path(out) if out else Path(recipe).with_suffix(".tuned.yaml")
    _write_recipe(path, Path(recipe), overrides, chosen, table, cores, device, precision, budget_s)
    return {"recipe": str(recipe), "tuned": str(path), "chosen": {f"data.{k}": v for k, v in chosen.items()},
            "img_per_s": final, "recipe_img_per_s": start, "table": table, "cores": cores, "device": str(device),
            "precision": precision, "seconds_per_setting": round(seconds, 1), "cpu": platform.processor()}


def _write_recipe(path: Path, recipe: Path, overrides: Sequence[str], chosen: Dict, table: List[Dict], cores: int,
                  device, precision: str, budget_s: float) -> None:
    import yaml

    from .config import parse_overrides

    body = parse_overrides(list(overrides)) if overrides else {}
    body.setdefault("data", {}).update(chosen)
    base = os.path.relpath(recipe.resolve(), path.resolve().parent)
    lines = [f"# written by `fastvit tune {recipe}` on {time.strftime('%Y-%m-%d')}: {cores} cores, {device}, "
             f"{precision}, {budget_s:g} s budget",
             "# the loader's img/s per setting, one knob at a time (the others at their best so far):"]
    for r in table:
        lines.append(f"#   data.{r['knob']}={r['value']}: {r['img_per_s']} img/s")
    text = "\n".join(lines) + "\n" + yaml.safe_dump({"base": base, **body}, sort_keys=False)
    path.write_text(text)
