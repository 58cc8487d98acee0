"""PNG figures, drawn headless (matplotlib's Agg backend): CKA heatmaps, attention distance and entropy per head,
training curves of runs side by side, and benchmark bars with their ratios written on them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return out


def cka_heatmap(matrix: Sequence[Sequence[float]], label_a: str, label_b: str, out: Path, title: str = "") -> Path:
    """Rows: representations of A (0 = embedding .. depth), columns: of B; 0 at the bottom-left as in the paper."""
    plt = _plt()
    rows, cols = len(matrix), len(matrix[0])
    fig, ax = plt.subplots(figsize=(4.2 + 0.1 * cols, 3.6 + 0.1 * rows))
    im = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_ylabel(f"layer of {label_a}")
    ax.set_xlabel(f"layer of {label_b}")
    ax.set_xticks(range(0, cols, max(1, cols // 7)))
    ax.set_yticks(range(0, rows, max(1, rows // 7)))
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_title(title, fontsize=9)
    return _save(fig, out)


def attention_figure(models: List[Dict], out: Path, title: str = "") -> Path:
    """Two panels, mean attention distance (px) and entropy: a dot per head at its layer (1-based), a line through
    each model's per-layer mean, one colour per model (the paper's Figure 5 layout)."""
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    n = len(models)
    for k, m in enumerate(models):
        colour = COLOURS[k % len(COLOURS)]
        for ax, key in zip(axes, ("distance_px", "entropy")):
            v = np.asarray(m[key])  # [depth, heads]
            depth, heads = v.shape
            x = np.arange(1, depth + 1) + (k - (n - 1) / 2) * 0.12  # side by side within a layer
            ax.scatter(np.repeat(x, heads), v.reshape(-1), s=14, alpha=0.55, color=colour)
            ax.plot(x, v.mean(1), color=colour, marker="*", markersize=8, label=m["label"])
    axes[0].set_ylabel("mean attention distance (px)")
    axes[1].set_ylabel("attention entropy (nats)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def _rows(run: Path) -> List[Dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_curves(runs: Sequence[str], out: Path) -> Path:
    """One panel per quantity the runs logged (training loss always; k-NN top-1 and eval top-1 where present),
    every run a colour, against epochs."""
    plt = _plt()
    data = {str(r): _rows(r) for r in runs}
    panels = [("loss", "training loss")]
    for key, name in (("knn_top1", "k-NN top-1 (%)"), ("eval_top1", "eval top-1 (%)")):
        if any(key in row for rows in data.values() for row in rows):
            panels.append((key, name))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for k, (run, rows) in enumerate(data.items()):
        colour = COLOURS[k % len(COLOURS)]
        for ax, (key, name) in zip(axes[0], panels):
            pts = [(r.get("eval_epoch", r["epoch"]), r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=colour, marker="o" if len(pts) < 30 else None, markersize=3,
                        label=Path(run).name)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, out)


def bars(names: Sequence[str], values: Sequence[float], ratios: Sequence[Optional[str]], out: Path, ylabel: str,
         title: str = "") -> Path:
    """A bar per case, its value and (where given) its ratio written on it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 1.1 * len(names)), 4))
    pos = range(len(names))
    drawn = ax.bar(pos, values, color=[COLOURS[i % len(COLOURS)] for i in pos])
    top = max(values) if values else 1.0
    for bar, v, r in zip(drawn, values, ratios):
        text = f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
        if r:
            text += f"\n{r}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01 * top, text, ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(list(pos))
    ax.set_xticklabels(names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center",
                       fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top * 1.2)
    ax.set_title(title, fontsize=9)
    return _save(fig, out)


def bench_plot(kind: str, res: Dict, out: Path) -> Path:
    """The bars of a `fastvit bench loader|model|e2e` result."""
    if kind == "loader":
        names = list(res["backends"]) + ["decode only"]
        values = [r["img_per_s"] for r in res["backends"].values()] + [res["decode_only_img_per_s"]]
        ratios = [f"{r['ratio_vs_torchvision']:.2f}x tv" if r.get("ratio_vs_torchvision") else None
                  for r in res["backends"].values()] + ["ceiling"]
        title = f"loader img/s, {res['images']} images, {res.get('workers', '?')} workers, {res['device']}"
    elif kind == "model":
        names = [f"{r.get('method', 'timm')}\n{r['engine']} {r.get('attn', '')}".strip() for r in res["runs"]]
        values = [r["img_per_s"] for r in res["runs"]]
        ratios = [f"{r['ratio_vs_first']:.2f}x" if r.get("ratio_vs_first") else None for r in res["runs"]]
        title = f"train-step img/s, {res['precision']}, {res['env']['device']}"
    elif kind == "e2e":
        names = ["loader", "model", "e2e"]
        values = [res[n]["img_per_s"] for n in names]
        ratios = [None, None, f"{res['e2e']['vs_model']:.2f}x model"]
        title = f"{res['engine']} engine, {res['backend']} loader, {res['precision']}: bound by the {res['bound_by']}"
    else:
        raise ValueError(f"bench plot: unknown kind {kind!r}")
    return bars(names, values, ratios, out, "img/s", title)
