"""The online k-NN monitor's curves of several runs: a markdown table (stdout) and a PNG.
    python benchmarks/knn_curves.py runs/ssl_demos --png benchmarks/results/cpu_ssl_knn.png
Each run directory's metrics.jsonl gives its k-NN top-1 per evaluation, its losses and img/s (median of the log
intervals)."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_run(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    knn = [(r["epoch"], r["knn_top1"], r.get("knn_top5")) for r in rows if "knn_top1" in r]
    train = [r for r in rows if "loss" in r and "img_per_s" in r]
    return {"name": run.name, "knn": knn, "loss": [(r["step"], r["loss"]) for r in train],
            "img_s": statistics.median(r["img_per_s"] for r in train) if train else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, help="a folder of run directories (or one run)")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--start", action="append", default=[], metavar="RUN=TOP1",
                    help="the k-NN top-1 of RUN's encoder before training (epoch 0), e.g. from fastvit knn")
    a = ap.parse_args()
    dirs = [a.runs] if (a.runs / "metrics.jsonl").exists() else sorted(p for p in a.runs.iterdir()
                                                                       if (p / "metrics.jsonl").exists())
    runs = [read_run(d) for d in dirs]
    start = dict(item.split("=", 1) for item in a.start)
    for r in runs:
        if r["name"] in start:
            r["knn"].insert(0, (0, float(start[r["name"]]), None))
    epochs = sorted({e for r in runs for e, *_ in r["knn"]})
    print("| run | " + " | ".join(f"k-NN top-1 after epoch {e:g}" if e else "k-NN top-1 at initialisation"
                                   for e in epochs) + " | first / last loss | img/s (median) |")
    print("|---|" + "---:|" * (len(epochs) + 2))
    for r in runs:
        by_epoch = {e: t for e, t, _ in r["knn"]}
        cells = [f"{by_epoch[e]:.2f}%" if e in by_epoch else "-" for e in epochs]
        loss = f"{r['loss'][0][1]:.4f} / {r['loss'][-1][1]:.4f}" if r["loss"] else "-"
        print(f"| {r['name']} | " + " | ".join(cells) + f" | {loss} | {r['img_s']:.1f} |")
    if a.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
        for r in runs:
            if r["knn"]:
                ax.plot([e for e, *_ in r["knn"]], [t for _, t, _ in r["knn"]], marker="o", label=r["name"])
            if r["loss"]:
                first = r["loss"][0][1]
                bx.plot([s for s, _ in r["loss"]], [v / first for _, v in r["loss"]], label=r["name"])
        ax.set(xlabel="epoch (0: the initialised encoder)", ylabel="k-NN top-1 (%)", title="online k-NN monitor")
        ax.xaxis.get_major_locator().set_params(integer=True)
        bx.set(xlabel="optimizer step", ylabel="loss / first logged loss", title="training loss (relative)")
        for x in (ax, bx):
            x.grid(alpha=0.3)
            x.legend()
        fig.tight_layout()
        a.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.png, dpi=110)


if __name__ == "__main__":
    main()
