"""Write benchmarks/results/paper_table_fmnist.md (to stdout) and its diagonal-CKA and attention PNGs (into --res)
from the runs of benchmarks/paper_table.sh.
    python benchmarks/paper_table.py runs/paper_fmnist --res benchmarks/results
        > benchmarks/results/paper_table_fmnist.md
Every figure is read from the runs: metrics.jsonl of each pre-training and fine-tune, the probes' JSONs, the
analyses' JSONs, and times.tsv (wall and CPU seconds of every command the script ran)."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

STUDENTS = ["mae", "mocov3", "dino", "simmim", "dmae", "d2mae"]
LABELS = {"mae": "MAE", "mocov3": "MoCo-v3", "dino": "DINO", "simmim": "SimMIM", "dmae": "D-MAE",
          "d2mae": "D²-MAE", "scratch": "scratch", "teacher": "MAE-Small teacher"}
MIM = ("mae", "simmim", "dmae", "d2mae")  # masked-image-modelling students ("MAE-style" in the paper's sense)
CONTRASTIVE = ("mocov3", "dino")
DISTILLED = ("dmae", "d2mae")


# ---------------------------------------------------------------------------------------------------- reading runs
def jsonl(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def top1s(out: Path, pattern: str) -> Dict[str, float]:
    """seed -> top1 of the probe JSONs matching pattern (e.g. 'linprobe_mae_s*.json')."""
    return {p.stem.rsplit("_s", 1)[1]: json.loads(p.read_text())["top1"] for p in sorted(out.glob(pattern))}


def finetune(out: Path, prefix: str, init: str) -> Dict[str, Tuple[float, float, int, str]]:
    """seed -> (best eval top-1, last eval top-1, last epoch, precision it ran in) of the fine-tunes
    <prefix>_<init>_s<seed>."""
    res = {}
    for run in sorted(out.glob(f"{prefix}_{init}_s*")):
        evals = [r for r in jsonl(run / "metrics.jsonl") if "eval_top1" in r]
        if evals:
            res[run.name.rsplit("_s", 1)[1]] = (max(e["eval_top1"] for e in evals), evals[-1]["eval_top1"],
                                                round(evals[-1]["eval_epoch"]), evals[-1].get("eval_precision"))
    return res


def times(out: Path, name: str = "times.tsv") -> List[Tuple[float, float, str]]:
    """(wall s, cpu s, command) of every command run.  times.tsv: 'real user sys<TAB>command'."""
    rows = []
    path = out / name
    for ln in path.read_text().splitlines() if path.is_file() else []:
        t, _, cmd = ln.partition("\t")
        real, user, sys_ = (float(x) for x in t.split())
        rows.append((real, user + sys_, cmd))
    return rows


def run_time(rows, run_dir: Path) -> Tuple[float, float]:
    """Wall and CPU seconds of the commands that wrote run_dir (a run resumed over sittings: their sum). Matched by
    the run's name: the record (REC) holds runs that were written under OUT."""
    out_arg = re.compile(rf"--out (\S*/)?{re.escape(run_dir.name)} ")
    hits = [(r, c) for r, c, cmd in rows if out_arg.search(cmd + " ")]
    return sum(h[0] for h in hits), sum(h[1] for h in hits)


def weights_digest(path: Path) -> str:
    """sha256 over an exported model's tensors (names, dtypes, shapes, bytes; in name order): the same digest means
    the same weights, whatever pickling wrote around them."""
    import hashlib

    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def mark_finished(run: Path, epochs: int, teacher: Path | None = None) -> dict:
    """run/finished.json: what a later sitting, without this one's weights, needs to know of a finished run: when and
    on what CPU it ran, the digest of its exported weights (a pre-training made again must match it for the
    evaluations recorded from it to stand) and, for a distilled student, the teacher's digest."""
    from fastvit_pt.engine.checkpoint import model_path

    import torch

    mark = {"epochs": epochs, "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu": cpu_model(), "threads": torch.get_num_threads()}  # the weights depend on both
    exported = model_path(run, epochs)
    if not exported.is_file():
        sys.exit(f"paper_table.py --mark: {run} has no {exported.name}: not a finished run of {epochs} epochs")
    mark["weights"] = weights_digest(exported)
    if teacher is not None:
        mark["teacher"] = finished(teacher).get("weights")
    (run / "finished.json").write_text(json.dumps(mark, indent=1) + "\n")
    return mark


def finished(run: Path) -> dict:
    path = run / "finished.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_config(run: Path) -> dict:
    import yaml

    path = run / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------------------------------ formatting
def mean(xs: Sequence[float]) -> float:
    return statistics.mean(xs) if xs else float("nan")


def std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def cell(xs: Sequence[float]) -> str:
    """'mean ± sample std'; a single value alone; '-' for none."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{mean(xs):.2f} ± {std(xs):.2f}"


def hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def cpu_model() -> str:
    """The CPU and its kernel flags, as the step policy keys its cache (fastvit_pt.engine.policy.device_key)."""
    import torch

    from fastvit_pt.engine.policy import device_key

    key = device_key(torch.device("cpu"))
    return f"{key['device'].rsplit(' (', 1)[0]} ({', '.join(key['flags'])})"  # without its ' (N threads)'


# ---------------------------------------------------------------------------------------------------------- figures
def save(fig, ax, title: str, png: Path) -> None:
    """The figures' common finish: grid, legend, title, a PNG at 110 dpi."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def cka_diagonal(out: Path, png: Path) -> Dict[str, List[float]]:
    """CKA of student layer i against teacher layer i (the heatmaps' diagonal), one line per student: a PNG."""
    diag = {}
    for m in ("mae", "dmae", "d2mae"):
        path = out / f"cka_{m}_vs_teacher.json"
        if path.is_file():
            mat = json.loads(path.read_text())["cka"]
            diag[m] = [mat[i][i] for i in range(min(len(mat), len(mat[0])))]
    if diag:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for m, ys in diag.items():
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=f"{LABELS[m]}-Tiny")
        ax.set_xlabel("layer i (0 = patch embedding, 12 = final norm)")
        ax.set_ylabel("linear CKA with the teacher's layer i")
        ax.set_ylim(0, 1.02)
        save(fig, ax, "Student vs MAE-Small teacher, layer by layer (Fashion-MNIST test)", png)
    return diag


def length_curves(out: Path, ft: Dict[str, dict], ft2: Dict[str, dict],
                  png: Path) -> Dict[str, Dict[str, Dict[int, float]]]:
    """init -> seed -> {fine-tune epochs: top-1 at its end} over the runs of different lengths of one init and seed
    (ft_ and ft2x_, read by finetune() already, and ftlen<N>_), and their PNG: top-1 against the length."""
    curves: Dict[str, Dict[str, Dict[int, float]]] = {}
    for i in ft:
        shorter = sorted({r.name.split("_", 1)[0] for r in out.glob(f"ftlen*_{i}_s*")})
        runs: Dict[str, Dict[int, float]] = {}
        for by_seed in [ft[i], ft2[i]] + [finetune(out, p, i) for p in shorter]:
            for seed, (_, last_top1, epoch, _) in by_seed.items():
                runs.setdefault(seed, {})[epoch] = last_top1
        runs = {s: dict(sorted(c.items())) for s, c in runs.items() if len(c) > 1}
        if runs:
            curves[i] = runs
    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter

        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for i, runs in curves.items():
            for s, c in runs.items():
                ax.plot(list(c), list(c.values()), marker="o", ms=3, label=f"{LABELS[i]} (seed {s})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({e for runs in curves.values() for c in runs.values() for e in c}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("fine-tune epochs (each point: its own run, cosine schedule to that length)")
        ax.set_ylabel("top-1 at the end (%)")
        save(fig, ax, "Fine-tune length on 10% of Fashion-MNIST's labels", png)
    return curves


def attention_models(out: Path) -> List[dict]:
    """The encoders' entries of analyze attention's JSONs (attention_<run>.json, one per encoder, made in its
    column while its weights were on disk; attention.json, several at once), in the table's order."""
    models = {}
    for path in sorted(out.glob("attention*.json")):
        for m in json.loads(path.read_text())["models"]:
            models[Path(m["checkpoint"]).name] = m
    order = STUDENTS + ["teacher"]
    return [models[k] for k in sorted(models, key=lambda k: order.index(k) if k in order else len(order))]


def attention(out: Path, png: Path) -> Dict[str, Dict[str, List[float]]]:
    """run -> {'distance_px': per-layer mean over heads, 'entropy': ...}, and the figure of every encoder (PNG)."""
    models = attention_models(out)
    if models:
        from fastvit_pt.analysis.plots import attention_figure

        attention_figure(models, png, "Fashion-MNIST test, 1,000 images: mean attention distance and entropy")
    return {Path(m["checkpoint"]).name: {k: [mean(h) if isinstance(h, list) else h for h in m[k]]
                                         for k in ("distance_px", "entropy")} for m in models}


# -------------------------------------------------------------------------------------------------------- the table
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/paper_fmnist"))
    ap.add_argument("--res", type=Path, default=Path("benchmarks/results"), help="where the PNGs go")
    ap.add_argument("--note", action="append", default=[],
                    help="a line for the header (how the runs were made, e.g. two invocations of one thread each)")
    ap.add_argument("--mark", type=Path, metavar="RUN", help="write RUN/finished.json (the script does, after each "
                    "run: its time, CPU and weights' digest) and print it, instead of the table")
    ap.add_argument("--epochs", type=int, help="with --mark: the run's length (its export model-NNNN.pt)")
    ap.add_argument("--teacher", type=Path, metavar="RUN", help="with --mark: the teacher the run distilled")
    args = ap.parse_args()
    if args.mark:
        if args.epochs is None:
            ap.error("--mark needs --epochs")
        print(json.dumps(mark_finished(args.mark, args.epochs, args.teacher)))
        return
    out, res = args.out, args.res
    if not (out / "times.tsv").is_file():
        sys.exit(f"paper_table.py: {out} holds no runs of benchmarks/paper_table.sh (no times.tsv): run the script "
                 "first, or pass its OUT")
    res.mkdir(parents=True, exist_ok=True)
    import timm
    import torch

    rows_t = times(out)
    students = [m for m in STUDENTS if (out / m / "metrics.jsonl").is_file()]
    inits = students + ["scratch"]
    ft = {i: finetune(out, "ft", i) for i in inits}
    ft2 = {i: finetune(out, "ft2x", i) for i in inits}
    lp = {i: top1s(out, f"linprobe_{i}_s*.json") for i in inits + ["teacher"]}
    knn = {i: top1s(out, f"knn_{i}_s*.json") for i in inits + ["teacher"]}
    # the fine-tune's top-1 is its last evaluation (the model a user keeps); 'best' only shows beside it
    best = {i: [v[0] for v in ft[i].values()] for i in inits}
    last = {i: [v[1] for v in ft[i].values()] for i in inits}
    L = {i: list(lp[i].values()) for i in lp}
    K = {i: list(knn[i].values()) for i in knn}

    # pre-training: images seen, img/s, wall and CPU time
    pre = {}
    for m in students + (["teacher"] if (out / "teacher" / "metrics.jsonl").is_file() else []):
        log = [r for r in jsonl(out / m / "metrics.jsonl") if "loss" in r and "img_per_s" in r]
        cfg = read_config(out / m)
        batch = cfg.get("train", {}).get("global_batch", 0)
        wall, cpu = run_time(rows_t, out / m)
        logged = not wall and log and "time" in log[0]
        if logged:  # run outside the script (no times.tsv entry): the training loop's own time from its log
            wall = log[-1]["time"] - log[0]["time"] + log[0]["step"] * batch / log[0]["img_per_s"]
        pre[m] = dict(images=log[-1]["step"] * batch if log else 0, loss=(log[0]["loss"], log[-1]["loss"]) if log
                      else (float("nan"),) * 2, rate=statistics.median(r["img_per_s"] for r in log) if log else 0.0,
                      wall=wall, cpu=cpu, logged=logged, model=cfg.get("model", {}).get("name", "?"),
                      precision=cfg.get("engine", {}).get("precision", "?"), epochs=cfg.get("train", {}).get("epochs"))

    def diff(a: str, b: str, d: Dict[str, List[float]]) -> str:
        return f"{mean(d[a]) - mean(d[b]):+.2f}" if d.get(a) and d.get(b) else "-"

    # a fine-tune scored once (at its end) has one top-1: the 'best' and 'last' columns only when they can differ
    both = best != last
    ft_head = "fine-tune top-1 (best eval) | fine-tune top-1 (last epoch)" if both else "fine-tune top-1"
    table = [f"| ViT-Tiny init | {ft_head} | linear probe top-1 | "
             "k-NN top-1 | fine-tune - MAE | pre-training img/s | pre-training wall | images seen |",
             "|---|---:|" + "---:|" * both + "---:|---:|---:|---:|---:|---:|"]
    for i in inits:
        p = pre.get(i)
        ft_cells = f"{cell(best[i])} | {cell(last[i])}" if both else cell(last[i])
        table.append(f"| {LABELS[i]} | {ft_cells} | {cell(L[i])} | {cell(K[i])} | "
                     f"{diff(i, 'mae', last) if i != 'mae' else ''} | "
                     + (f"{p['rate']:.0f} | {hms(p['wall'])}{'*' if p['logged'] else ''} | {p['images']:,} |" if p
                        else "- | - | - |"))
    ft_seeds = sorted({s for i in inits for s in ft[i]})  # every seed some fine-tune or probe ran with
    lp_seeds = sorted({s for i in lp for s in lp[i]})
    seeds_table = ["| init | " + " | ".join(f"fine-tune s{s}" for s in ft_seeds or ["-"])
                   + " | " + " | ".join(f"linprobe s{s}" for s in lp_seeds or ["-"]) + " |"]
    seeds_table.append("|---|" + "---:|" * (seeds_table[0].count("|") - 2))
    for i in inits + ["teacher"]:
        fts = [f"{ft[i][s][1]:.2f}" if s in ft.get(i, {}) else "-" for s in ft_seeds or ["-"]]
        lps = [f"{lp[i][s]:.2f}" if s in lp[i] else "-" for s in lp_seeds or ["-"]]
        seeds_table.append(f"| {LABELS[i]} | " + " | ".join(fts + lps) + " |")

    notes: List[str] = []
    # --- the teacher's margin over its student
    t = pre.get("teacher")
    if t and L["teacher"] and L.get("mae"):
        margin_lp = mean(L["teacher"]) - mean(L["mae"])
        margin_knn = mean(K["teacher"]) - mean(K["mae"]) if K["teacher"] and K["mae"] else float("nan")
        clear = margin_lp > 2 * max(std(L["mae"]), std(L["teacher"]), 0.1) and margin_knn > 1.0
        notes.append(
            f"- **Teacher's margin over the student**: MAE-Small ({t['images']:,} images, {hms(t['wall'])} wall, "
            f"{t['rate']:.0f} img/s) against the MAE-Tiny student ({pre['mae']['images']:,} images): linear probe "
            f"{mean(L['teacher']):.2f} vs {mean(L['mae']):.2f} (**{margin_lp:+.2f}**), k-NN {cell(K['teacher'])} vs "
            f"{cell(K['mae'])} (**{margin_knn:+.2f}**); reconstruction loss {t['loss'][1]:.4f} vs "
            f"{pre['mae']['loss'][1]:.4f}. "
            + ("A clear margin: the teacher is one worth distilling." if clear else
               "**Not a clear margin**: D-MAE and D²-MAE below distil a teacher that is not clearly better."))

    # --- convergence of the fine-tunes
    for i in inits:
        pairs = [(s, ft[i][s][1], ft2[i][s][1], ft[i][s][2], ft2[i][s][2]) for s in ft2[i] if s in ft[i]]
        if not pairs:
            continue
        spread = std(last[i])
        moves = [b - a for _, a, b, _, _ in pairs]
        ok = all(abs(d) < spread for d in moves)
        notes.append(
            f"- **Convergence ({LABELS[i]})**: doubling the fine-tune from {pairs[0][3]} to {pairs[0][4]} epochs moves "
            "top-1 by " + ", ".join(f"{d:+.2f} (seed {s}: {a:.2f} -> {b:.2f})" for d, (s, a, b, _, _) in
                                    zip(moves, pairs))
            + (f" against a seed spread (std over {len(last[i])} seeds) of {spread:.2f}: "
               + ("converged by the issue's test." if ok else "**not converged** by the issue's test (the move is "
                  "larger than the spread): the rows compare equal budgets, not end points.")
               if len(last[i]) > 1 else "; one seed only, so no seed spread to hold it against yet."))

    curves = length_curves(out, ft, ft2, res / "paper_ft_length_fmnist.png")
    lengths = sorted({e for runs in curves.values() for c in runs.values() for e in c})
    length_table = ["| init (seed) | " + " | ".join(f"{e} ep" for e in lengths) + " |",
                    "|---|" + "---:|" * len(lengths)] if curves else []
    for i, runs in curves.items():
        for s, c in runs.items():
            cells, prev = [], None
            for e in lengths:
                cells.append("-" if e not in c else f"{c[e]:.2f}" if prev is None else
                             f"{c[e]:.2f} ({c[e] - prev:+.2f})")
                prev = c.get(e, prev)
            length_table.append(f"| {LABELS[i]} ({s}) | " + " | ".join(cells) + " |")

    flat = [m for m in students if pre[m]["loss"][1] >= 0.98 * pre[m]["loss"][0]]
    if flat:
        notes.append("- **Pre-training loss did not fall**: " + ", ".join(
            f"{LABELS[m]} ({pre[m]['loss'][0]:.4f} -> {pre[m]['loss'][1]:.4f})" for m in flat)
            + ": in this budget the method has not started to train its encoder; read its rows as such.")
    missing = [LABELS[m] for m in STUDENTS if m not in students] + ["scratch"] * (not ft["scratch"])
    if missing:
        notes.append(f"- **Not in this table yet**: {', '.join(missing)} (not run yet; "
                     "`METHODS=\"...\" bash benchmarks/paper_table.sh` adds their rows to the same record).")

    # --- the paper's observations
    obs: List[str] = []

    def first_half(ranked: List[str], ft_: Dict[str, List[float]]) -> str:
        """The verdict on 'MAE-style pre-training gives the best fine-tuned tiny ViT': plain masked-image modelling
        (MAE, SimMIM) against the contrastive methods; the distilled MAE students only as a partial support (they
        need a teacher the others do not); and MAE against a random init, the paper's first claim."""
        plain = [i for i in ranked if i in MIM and i not in DISTILLED]
        contr = [i for i in ranked if i in CONTRASTIVE]
        top = ranked[0]
        text = f"The best is {LABELS[top]}"
        if not contr:
            verdict = "no contrastive row to hold it against"
        elif plain and mean(ft_[plain[0]]) > mean(ft_[contr[0]]):
            verdict = (f"plain masked-image modelling ({LABELS[plain[0]]}) beats the best contrastive method "
                       f"({LABELS[contr[0]]}): **supports** the first half")
        elif top in MIM:
            verdict = (f", a distilled MAE; without the teacher {LABELS[contr[0]]} beats plain masked-image modelling"
                       + (f" (best: {LABELS[plain[0]]})" if plain else "") + ": **partly supports** the first half")
        else:
            verdict = f", a contrastive method: **contradicts** the first half"
        text += verdict if verdict.startswith(",") else f": {verdict}"
        if "mae" in ft_ and ft_.get("scratch") and ft_["mae"]:
            m, r = mean(ft_["mae"]), mean(ft_["scratch"])
            noise = max((x for x in (std(ft_["mae"]), std(ft_["scratch"])) if x == x), default=0.0)  # nan: 1 seed
            if abs(m - r) <= noise:
                text += (f"; and MAE is level with the random init ({m:.2f} vs {r:.2f}, within the seed spread "
                         f"of {noise:.2f}), where the paper finds MAE ahead")
            elif m < r:
                text += f"; and MAE is below the random init ({m:.2f} vs {r:.2f}), against the paper's first result"
        return text + ". "

    ranked = sorted((i for i in students if last[i]), key=lambda i: -mean(last[i]))
    if ranked:
        top = ranked[0]
        lp_mae = mean(L.get("mae", []))
        contr = [c for c in CONTRASTIVE if L.get(c)]
        lp_line = "; ".join(f"{LABELS[c]} {mean(L[c]):.2f} vs MAE {lp_mae:.2f} ({mean(L[c]) - lp_mae:+.2f})"
                            for c in contr)
        better_lp = [c for c in contr if mean(L[c]) > lp_mae]
        obs.append(
            f"1. *MAE-style pre-training gives the best fine-tuned tiny ViT; contrastive methods the better linear "
            f"probe.* Fine-tune ranking: " + ", ".join(f"{LABELS[i]} {mean(last[i]):.2f}" for i in ranked)
            + (f" (scratch {mean(last['scratch']):.2f}). " if last["scratch"] else " (no scratch row yet). ")
            + first_half(ranked, last)
            + (f"Linear probe: {lp_line}: " + ("**supports** the second half." if len(better_lp) == len(contr) else
                                               "**partly supports** the second half." if better_lp else
                                               "**contradicts** the second half.") if contr else
               "Linear probe: no contrastive row yet: the second half is **not tested** here."))
    d_rows = [d for d in ("dmae", "d2mae") if last.get(d) and last.get("mae")]
    if d_rows:
        parts = []
        for d in d_rows:
            gap = mean(last[d]) - mean(last["mae"])
            noise = max(std(last[d]), std(last["mae"]))
            parts.append(f"{LABELS[d]} {mean(last[d]):.2f} vs MAE {mean(last['mae']):.2f} ({gap:+.2f}"
                         + (", within the seed spread" if abs(gap) <= noise else "") + ")")
        up = [d for d in d_rows if mean(last[d]) >= mean(last["mae"])]
        obs.append("2. *Distillation from a stronger MAE teacher lifts MAE-Tiny (D-MAE, D²-MAE >= MAE).* Fine-tune: "
                   + "; ".join(parts) + "; linear probe "
                   + "; ".join(f"{LABELS[d]} {diff(d, 'mae', L)}" for d in d_rows) + ", k-NN "
                   + "; ".join(f"{LABELS[d]} {diff(d, 'mae', K)}" for d in d_rows) + ": "
                   + ("**supports** it." if len(up) == len(d_rows) else "**partly supports** it." if up else
                      "**contradicts** it."))
    diag = cka_diagonal(out, res / "paper_cka_fmnist.png")
    if "mae" in diag:
        n = len(diag["mae"])
        lo, hi = slice(1, n // 3 + 1), slice(n - n // 3 - 1, n - 1)  # blocks 1-4 and 8-11 of 12 (final norm aside)
        low, high = mean(diag["mae"][lo]), mean(diag["mae"][hi])
        gaps = "; ".join(f"{LABELS[d]} {mean(diag[d][hi]):.2f} ({mean(diag[d][hi]) - high:+.2f})"
                         for d in ("dmae", "d2mae") if d in diag)
        closes = [d for d in ("dmae", "d2mae") if d in diag and mean(diag[d][hi]) > high]
        obs.append(
            f"3. *MAE-Tiny's lower layers resemble the teacher's and its higher layers do not; distillation closes "
            f"the gap in the higher layers* (`paper_cka_fmnist.png`, the diagonal of the CKA heatmaps). MAE-Tiny: "
            f"blocks {lo.start}-{lo.stop - 1} CKA {low:.2f}, blocks {hi.start}-{hi.stop - 1} {high:.2f}: "
            + ("**supports** the first half" if low > high + 0.05 else "**contradicts** the first half")
            + f". Higher blocks, distilled: {gaps}: "
            + ("**supports** the second half." if closes and len(closes) == len([d for d in ('dmae', 'd2mae')
                                                                                 if d in diag])
               else "**partly supports** the second half." if closes else "**contradicts** the second half."))
    att = attention(out, res / "paper_attention_fmnist.png")
    if "mae" in att and any(c in att for c in CONTRASTIVE):
        n = len(att["mae"]["distance_px"])
        hi = slice(n - n // 3, n)
        d_mae, e_mae = mean(att["mae"]["distance_px"][hi]), mean(att["mae"]["entropy"][hi])
        cmp = [(c, mean(att[c]["distance_px"][hi]), mean(att[c]["entropy"][hi])) for c in CONTRASTIVE if c in att]
        local = [c for c, d, _ in cmp if d_mae < d]
        # uniform attention over the grid's L patches: entropy log L and the grid's mean pairwise distance. Models
        # whose attention has not left it carry no locality to compare.
        geo = read_config(out / "mae").get("model", {})
        grid = geo.get("img_size", 0) // max(geo.get("patch_size", 1), 1)
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        c = torch.stack([ys.flatten(), xs.flatten()], 1).double() * geo.get("patch_size", 1)
        d_uni, e_uni = torch.cdist(c, c).mean().item(), math.log(grid * grid) if grid else float("nan")
        uniform = all(e > 0.95 * e_uni for e in [e_mae] + [e for _, _, e in cmp])
        verdict = ("**supports** it." if len(local) == len(cmp) else "**partly supports** it." if local else
                   "**contradicts** it.")
        if uniform:
            verdict = (f"**inconclusive**: every one of them attends almost uniformly there (uniform attention over "
                       f"the {grid} x {grid} grid: entropy log {grid * grid} = {e_uni:.2f}, distance {d_uni:.2f} px), "
                       "so at this budget none has learned where to look.")
        distilled = ""
        if "teacher" in att:
            lasts = "; ".join(f"{LABELS[d]} {att[d]['entropy'][-1]:.2f}" for d in ("mae",) + DISTILLED if d in att)
            distilled = (f" Last block's entropy, where D-MAE distils the teacher's attention: {lasts}; the MAE-Small "
                         f"teacher {att['teacher']['entropy'][-1]:.2f}.")
        obs.append(
            f"4. *MAE attends more locally in the higher layers than MoCo-v3 and DINO* (`paper_attention_fmnist.png`)."
            f" Blocks {hi.start + 1}-{hi.stop}, mean attention distance (px) / entropy (nats): MAE {d_mae:.2f} / "
            f"{e_mae:.2f}; " + "; ".join(f"{LABELS[c]} {d:.2f} / {e:.2f}" for c, d, e in cmp) + ": " + verdict
            + distilled)

    # --- totals
    wall_all = sum(r for r, _, _ in rows_t)
    cpu_all = sum(c for _, c, _ in rows_t)
    remade = times(out, "times_remade.tsv")
    # every finished run's finished.json: the CPUs the table's runs ran on (sittings on different machines)
    marks = {r.name: finished(r) for r in sorted(out.iterdir()) if (r / "finished.json").is_file()}
    cpus: Dict[str, int] = {}
    for mk in marks.values():
        cpus[mk["cpu"]] = cpus.get(mk["cpu"], 0) + 1
    for d in DISTILLED:
        taught, teacher = marks.get(d, {}).get("teacher"), marks.get("teacher", {}).get("weights")
        if taught and teacher and taught != teacher:
            notes.append(f"- **{LABELS[d]} distilled another teacher** than the one in the table (weights sha256 "
                         f"{taught[:12]} against {teacher[:12]}): the teacher was pre-trained again on another CPU.")
    # the commands that ran, in order (a later sitting's '# skipped' lines repeat them)
    cmds = "\n".join(ln for ln in (out / "commands.txt").read_text().strip().splitlines()
                     if "   # skipped: " not in ln) if (out / "commands.txt").is_file() else "(not recorded)"
    ft_cfg = read_config(next(iter(sorted(out.glob("ft_*_s*"))), out / "none"))
    mae_cfg = read_config(out / "mae")
    model = mae_cfg.get("model", {})
    seeds = ft_seeds
    prec = sorted({p["precision"] for p in pre.values()})
    # 'auto' follows the CPU: what it resolved to is recorded by each evaluation
    ran = sorted({v[3] for i in inits for v in ft[i].values() if v[3]})
    if ran:
        prec = [f"{'/'.join(prec)} (resolved to {'/'.join(ran)} by the CPU, as the fine-tunes record)"]
    lines = [
        "# The paper's comparison at small scale: every pre-training method on Fashion-MNIST",
        "",
        f"Written by `benchmarks/paper_table.py` from the runs of `bash benchmarks/paper_table.sh`, "
        f"{datetime.date.today().isoformat()}.",
        "",
        (f"- Machine: {cpu_model()}, {os.cpu_count()} cores, no GPU; precision {', '.join(prec)}."
         if set(cpus) <= {cpu_model()} else
         "- Machines (the runs' finished.json; sittings on different CPUs): " + "; ".join(
             f"{c}: {k} run{'s' * (k != 1)}" for c, k in sorted(cpus.items(), key=lambda kv: -kv[1]))
         + f"; 2 cores each, no GPU; precision {', '.join(prec)}."),
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}.",
        f"- Students: ViT-Tiny (192-d, 12 blocks, 3 heads as timm's, {model.get('img_size')}-px images in "
        f"{model.get('patch_size')}-px patches: {(model.get('img_size', 0) // max(model.get('patch_size', 1), 1)) ** 2}"
        " tokens), recipes `recipes/paper_fmnist/<method>_tiny.yaml`; each saw the same images (column 'images "
        f"seen', unlabelled, at batch {mae_cfg.get('train', {}).get('global_batch', '?')}). One pre-training per "
        "method (seed 0).",
        "- Teacher (D-MAE, D²-MAE): `recipes/paper_fmnist/mae_small_teacher.yaml`, MAE-Small (384-d, 12 blocks) on "
        "the students' images and geometry" + (f", {pre['teacher']['images']:,} images." if "teacher" in pre else "."),
        f"- Fine-tune: `recipes/paper_fmnist/finetune.yaml`, {ft_cfg.get('train', {}).get('epochs', '?')} epochs on "
        "10% of the labels (the first 600 images of each class), evaluated on all 10,000 test images "
        + (f"every {ft_cfg.get('eval', {}).get('every_epochs', '?')} epochs ('best eval': the best of them, 'last "
           "epoch': the final one)" if both else "at its end") + ". `scratch`: the same fine-tune from a random init.",
        "- Linear probe: BatchNorm without affine + linear on frozen features, SGD lr 0.1, 90 epochs, the same 10% "
        "labels; k-NN: cosine, k=20, T=0.07, those 6,000 images as the bank; both on all 10,000 test images, "
        "reading images as each encoder was pre-trained.",
        f"- Seeds {', '.join(seeds)} for fine-tunes and linear probes (mean ± sample std over seeds; every value in "
        "'Per seed'). k-NN of a pre-trained encoder has no randomness: one value; the random encoders are drawn "
        "per seed. Pre-training variance is not in the spread (one run per method).",
        f"- Total: {hms(wall_all)} wall, {cpu_all / 3600:.2f} CPU-hours for every command of the script "
        f"({len(rows_t)} commands, `times.tsv`)"
        + (f"; besides, {len(remade)} pre-trainings made again where a later sitting needed the weights of one "
           f"recorded earlier ({hms(sum(r for r, _, _ in remade))}, `times_remade.tsv`)." if remade else "."),
        *(f"- {n}" for n in args.note),
        "",
        *table,
        "",
        *notes,
        "",
        "## The paper's observations at this scale",
        "",
        *obs,
        "",
        "![CKA with the teacher, layer by layer](paper_cka_fmnist.png)",
        "",
        "![attention distance and entropy](paper_attention_fmnist.png)",
        "",
        *(["## Fine-tune length", "",
           "Top-1 at the end of fine-tunes of each length (in brackets: the move from the previous length), from "
           "the convergence check's runs: how far each doubling still moves it (`paper_ft_length_fmnist.png`).", "",
           *length_table, "", "![top-1 against the fine-tune's length](paper_ft_length_fmnist.png)", ""]
          if curves else []),
        "## Per seed",
        "",
        *seeds_table,
        "",
        "## Pre-training",
        "",
        "| run | model | images seen | loss first -> last log | img/s (median of log intervals) | wall | CPU time "
        "| CPU |",
        "|---|---|---:|---|---:|---:|---:|---|",
        *(f"| {LABELS[m]} | {p['model']} | {p['images']:,} | {p['loss'][0]:.4f} -> {p['loss'][1]:.4f} | "
          f"{p['rate']:.0f} | {hms(p['wall'])}{'*' if p['logged'] else ''} | "
          f"{'-' if p['logged'] else hms(p['cpu'])} | {marks.get(m, {}).get('cpu', '-')} |" for m, p in pre.items()),
        *(["", "\\* run outside the script's timing (times.tsv): the training loop's time from its own log, "
           "start-up not included."] if any(p["logged"] for p in pre.values()) else []),
        "",
        "## Commands",
        "",
        "```",
        cmds,
        "```",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
