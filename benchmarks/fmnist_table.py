"""Write benchmarks/results/fmnist_accuracy.md from the runs of benchmarks/fmnist_accuracy.sh (to stdout).
    python benchmarks/fmnist_table.py runs/fmnist_acc > benchmarks/results/fmnist_accuracy.md"""
from __future__ import annotations

import datetime
import json
import platform
import re
import statistics
import sys
from pathlib import Path


def mean_spread(xs):
    """'mean ± sample std (values)'; a single value is shown alone."""
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} ({', '.join(f'{x:.2f}' for x in xs)})"


def finetune_rows(out: Path, init: str):
    best, final = [], []
    for run in sorted(out.glob(f"ft_{init}_s*")):
        evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "eval_top1" in ln]
        if evals:
            best.append(max(e["eval_top1"] for e in evals))
            final.append(evals[-1]["eval_top1"])
    return best, final


def probe(out: Path, kind: str, init: str):
    return [json.loads(p.read_text())["top1"] for p in sorted(out.glob(f"{kind}_{init}_s*.json"))]


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown"


def main(out: Path) -> None:
    import timm
    import torch

    pre = [json.loads(ln) for ln in (out / "mae_pretrain" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    pre = [r for r in pre if "loss" in r]
    ft = {i: finetune_rows(out, i) for i in ("mae", "scratch")}  # (best, last) per seed
    rows = []
    for label, get in (
        ("fine-tune top-1, best epoch", lambda i: ft[i][0]),
        ("fine-tune top-1, last epoch", lambda i: ft[i][1]),
        ("linear probe top-1", lambda i: probe(out, "linprobe", i)),
        ("k-NN top-1 (k=20, T=0.07)", lambda i: probe(out, "knn", i)),
    ):
        mae, scratch = get("mae"), get("scratch")
        delta = f"{statistics.mean(mae) - statistics.mean(scratch):+.2f}" if mae and scratch else "n/a"
        rows.append(f"| {label} | {mean_spread(mae)} | {mean_spread(scratch)} | {delta} |")
    notes = []
    ft_mae, ft_scr = ft["mae"][0], ft["scratch"][0]
    lp_mae, lp_scr = probe(out, "linprobe", "mae"), probe(out, "linprobe", "scratch")
    if ft_mae and ft_scr:
        verdict = "beats" if statistics.mean(ft_mae) > statistics.mean(ft_scr) else "does not beat"
        notes.append(f"- MAE pre-training {verdict} random initialisation in fine-tuning, by "
                     f"{statistics.mean(ft_mae) - statistics.mean(ft_scr):+.2f} points of top-1 (mean over seeds).")
    if ft_mae and lp_mae and statistics.mean(lp_mae) > statistics.mean(ft_mae):
        notes.append("- At this budget fine-tuning has not converged: a linear probe on the frozen MAE features "
                     f"({statistics.mean(lp_mae):.2f}%) beats fine-tuning the whole network ({statistics.mean(ft_mae):.2f}%), "
                     "and even the random encoder's probe"
                     + (f" ({statistics.mean(lp_scr):.2f}%)" if lp_scr else "")
                     + " beats its fine-tune. The improved recipe's RandAugment m10 + mixup are built for 300 "
                     "ImageNet epochs; 6 epochs of 23 steps under them underfit. The comparison is like for like, "
                     "and the gap is what it measures, not absolute Fashion-MNIST accuracy.")
    cmds = (out / "commands.txt").read_text().strip() if (out / "commands.txt").is_file() else "(not recorded)"
    pre_cfg = (out / "mae_pretrain" / "config.yaml")
    ft_cfg = next(iter(sorted(out.glob("ft_mae_s*"))), None)
    lines = [
        "# MAE vs scratch on Fashion-MNIST (the paper's finding, small scale, real data)",
        "",
        f"Written by `benchmarks/fmnist_table.py` from the runs of `bash benchmarks/fmnist_accuracy.sh`, "
        f"{datetime.date.today().isoformat()}.",
        "",
        f"- Hardware: {cpu_model()}, {torch.get_num_threads()} threads, no GPU (fp32: no native bf16 here).",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}.",
        "- Model: ViT-Tiny (192-d, 12 blocks, 12 heads) on native 28-px images with 4-px patches (49 tokens).",
        f"- Pre-training: MAE, mask 0.75, all 60,000 training images (labels unused), {pre[-1]['epoch']:.0f} epochs, "
        f"batch 256; loss {pre[0]['loss']:.4f} -> {pre[-1]['loss']:.4f}, "
        f"{statistics.median(r['img_per_s'] for r in pre):.0f} img/s.",
        "- Labels: a 10% budget, the first 600 training images of each class (6,000). Every accuracy is on all "
        "10,000 test images.",
        "- Fine-tuning: `recipes/demo/finetune_fmnist.yaml` (mae-lite's improved recipe: GAP + fc_norm, AdamW "
        "wd 0.05, lr 1e-3, 1 warm-up epoch then cosine to 1e-6, layer decay 0.85, RandAugment rand-m10-mstd0.5-inc1, "
        "mixup 0.2), 6 epochs, evaluated at epochs 3 and 6. `scratch` is the same run from a random initialisation.",
        "- Linear probe: BatchNorm without affine + linear on frozen features, SGD momentum 0.9, lr 0.1, "
        "90 epochs. k-NN: cosine, k=20, T=0.07, the 6,000 labelled images as the bank.",
        "- Seeds: fine-tuning and probes use seeds " + ", ".join(sorted({p.name.rsplit("_s", 1)[1] for p in out.glob("ft_mae_s*")}))
        + "; the MAE encoder is one pre-training run (its k-NN is deterministic: one value); the random encoders "
        "are drawn from each seed. Spread: sample standard deviation over seeds, values in brackets.",
        "",
        "| top-1 (%) | MAE pre-trained | scratch (random init) | MAE - scratch |",
        "|---|---|---|---|",
        *rows,
        "",
        *notes,
        "",
        "## Commands",
        "",
        "```",
        cmds,
        "```",
        "",
        f"Configurations as run: `{pre_cfg}`" + (f", `{ft_cfg / 'config.yaml'}`" if ft_cfg else "") + ".",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fmnist_acc"))
