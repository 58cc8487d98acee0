"""Metrics out: JSONL (one object per log), TensorBoard scalars, and a progress bar on rank 0."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional


class MetricLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, append: bool):
        self.enabled = enabled
        self.jsonl = open(run_dir / "metrics.jsonl", "a" if append else "w") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class Progress:
    """Progress of a long job on stderr, rank 0 only. On a terminal: a tqdm bar. Anywhere else (a log file,
    CI, `make demo | tee`): a plain line every `interval` seconds and one at the end, never carriage returns
    or cursor escapes. `postfix` values (loss, img/s, eta) ride along on both."""

    def __init__(self, enabled: bool, total: int, desc: str, unit: str = "it", interval: float = 10.0):
        self.bar = None
        self.enabled, self.total, self.desc, self.unit, self.interval = enabled, total, desc, unit, interval
        self.n, self.postfix = 0, {}
        self.t0 = self.last = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, mininterval=0.1,
                            file=sys.stderr)

    def update(self, n: int = 1, postfix: Optional[Dict[str, str]] = None) -> None:
        if not self.enabled:
            return
        self.n += n
        if postfix:
            self.postfix = dict(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}{rate}{extra}, {format_eta(elapsed)} elapsed",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n:
            self._line(time.perf_counter())
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize_run(run_dir: Path) -> Dict[str, float]:
    """First and last logged loss, median img/s and step count over a run's whole metrics.jsonl
    (resumed segments included)."""
    import statistics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]  # evaluation rows carry eval_* keys only
    if not train:
        return {}
    out = {
        "first_loss": train[0]["loss"],
        "last_loss": train[-1]["loss"],
        "img_per_s": statistics.median(r["img_per_s"] for r in train),
        "steps": train[-1]["step"],
        "epochs": train[-1]["epoch"],
    }
    evals = [r for r in rows if "eval_top1" in r]
    if evals:
        best = max(evals, key=lambda r: r["eval_top1"])
        out.update(eval_top1=evals[-1]["eval_top1"], best_top1=best["eval_top1"], best_top5=best["eval_top5"],
                   best_epoch=best["eval_epoch"])
    return out


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def runs_table(run_dirs) -> str:
    """A markdown table of training runs side by side: what each started from, epochs, and its evaluations
    (best and last top-1, top-5 at the best); pre-training runs show their loss instead."""
    import yaml

    lines = ["| run | init | epochs | best top-1 | last top-1 | top-5 at best | last loss |", "|---|---|---|---|---|---|---|"]
    for run in map(Path, run_dirs):
        if not (run / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{run} is not a run directory (no metrics.jsonl)")
        s = summarize_run(run)
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        # a method section with an init (fine-tuning); runs from before methods owned their sections kept it apart
        init = (cfg.get("method") or {}).get("init") or (cfg.get("finetune") or {}).get("init") or "-"
        cells = [f"{s['best_top1']:.2f} (ep {s['best_epoch']})", f"{s['eval_top1']:.2f}",
                 f"{s['best_top5']:.2f}"] if "best_top1" in s else ["-", "-", "-"]
        epochs = f"{s['epochs']:.0f}" if s else "0"
        loss = f"{s['last_loss']:.4f}" if s else "-"
        lines.append(f"| {run.name} | {init or '-'} | {epochs} | " + " | ".join(cells) + f" | {loss} |")
    return "\n".join(lines)
