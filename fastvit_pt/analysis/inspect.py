"""`fastvit analyze cka` and `fastvit analyze attention`: load encoders from anything `fastvit knn` reads, feed
them the same evaluation crops, write a JSON of the numbers and a PNG of them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch

from . import plots
from .attention import AttentionStats, encoder_attention
from .cka import MinibatchCKA, layer_representations


def label_for(checkpoint: str) -> str:
    """A short legend name: the run directory's name (a checkpoint file: its folder's), `random init` for scratch."""
    if checkpoint == "scratch":
        return "random init"
    p = Path(checkpoint)
    return p.parent.name if p.is_file() and p.suffix in (".pt", ".pth", ".tar") else p.name


def load_encoders(checkpoints: Sequence[str], recipe: Optional[str] = None):
    """[(encoder, cfg, import report)] for each checkpoint, read as `fastvit knn` reads it: its run's config (or
    `recipe`); a checkpoint with neither (scratch, a foreign file) takes the first run's config, else the code
    defaults. The images are read with the first encoder's config, so all of them must share its image size; every
    encoder is placed on that config's engine.device."""
    from ..distributed.env import pick_device
    from ..eval.checkpoints import eval_config, load_encoder

    found = []
    for ck in checkpoints:
        if ck != "scratch" and not Path(ck).exists():
            raise FileNotFoundError(f"checkpoint not found: {ck} (or pass scratch for a random initialisation)")
        found.append(eval_config(ck, recipe))
    own = [cfg for (cfg, origin), ck in zip(found, checkpoints) if ck != "scratch" and "run's config" in origin]
    out = []
    for ck, (cfg, origin) in zip(checkpoints, found):
        if "code defaults" in origin and own:
            cfg = own[0]
        encoder, report = load_encoder(ck, cfg)
        out.append((encoder, cfg, str(report)))
    dev = pick_device(out[0][1].engine.device)
    for encoder, _, _ in out:
        encoder.to(dev)
    size = out[0][1].model.img_size
    bad = [f"{ck} ({cfg.model.img_size} px)" for ck, (_, cfg, _) in zip(checkpoints, out) if cfg.model.img_size != size]
    if bad:
        raise ValueError(f"the encoders must read the same images: {checkpoints[0]} is {size} px, but {', '.join(bad)}")
    return out


def image_batches(cfg, data: str, images: int, batch: int) -> Iterator[torch.Tensor]:
    """Up to `images` evaluation crops of `data` in batches of `batch` (fp32, on cfg.engine.device), drawn in a
    seeded shuffle (cfg.train.seed) so a class-sorted folder is sampled across its classes."""
    from ..distributed.env import pick_device
    from ..eval.checkpoints import image_loader

    if not Path(data).exists():
        raise FileNotFoundError(f"--data: not found: {data}")
    loader = image_loader(cfg, data, batch, pick_device(cfg.engine.device), shuffle=True)
    seen = 0
    for b in loader:
        x = b.images[: images - seen].float()
        seen += x.shape[0]
        yield x
        if seen >= images:
            break


def _progress(total: int, desc: str):
    from ..engine.metrics import Progress

    return Progress(True, total, desc, unit="img", interval=5.0)


def analyze_cka(a: str, b: Optional[str], data: str, images: int = 2000, batch: int = 64,
                out_png: Optional[str] = None, recipe: Optional[str] = None, labels: Sequence[str] = ()) -> dict:
    """Minibatch linear CKA between every representation (0..depth) of encoder `a` and of `b` (a itself when b is
    None) on the same `images` images of `data`; writes out_png (default cka.png) and the JSON beside it."""
    if batch < 4 or images < 4:
        raise ValueError(f"--batch {batch} --images {images}: unbiased HSIC needs at least 4 images per minibatch")
    ckpts = [a] if b is None else [a, b]
    loaded = load_encoders(ckpts, recipe)
    enc_a, cfg, _ = loaded[0]
    enc_b = loaded[-1][0]
    acc = MinibatchCKA(enc_a.depth + 1, enc_b.depth + 1)
    used = 0
    with _progress(images, "cka") as bar:
        for x in image_batches(cfg, data, images, batch):
            if x.shape[0] < 4:  # a last partial minibatch too small for the unbiased estimator
                break
            fa = layer_representations(enc_a, x)
            fb = fa if b is None else layer_representations(enc_b, x)
            acc.update(fa, fb)
            used += x.shape[0]
            bar.update(x.shape[0])
    names = list(labels) or [label_for(c) for c in ckpts]
    names = names + names[:1] if len(names) == 1 else names
    res = {"a": a, "b": b or a, "label_a": names[0], "label_b": names[1], "data": str(data), "images": used,
           "minibatch": batch, "layers": "representation i = the patch tokens after i blocks through a LayerNorm (0 = "
           "embedding, depth = the final norm)", "cka": acc.value().tolist(),
           "imports": [r for _, _, r in loaded]}
    png = Path(out_png or "cka.png")
    plots.cka_heatmap(res["cka"], names[0], names[1], png, f"linear CKA, {used} images of {_short(data)}")
    res["png"] = str(png)
    res["json"] = str(_write(res, png))
    return res


def analyze_attention(checkpoints: Sequence[str], data: str, images: int = 2000, batch: int = 64,
                      out_png: Optional[str] = None, recipe: Optional[str] = None, labels: Sequence[str] = ()) -> dict:
    """Mean attention distance (px) and entropy of every layer and head of each encoder, averaged over `images`
    images of `data`; one PNG (default attention.png) with a colour per encoder, and the JSON beside it."""
    if images < 1:
        raise ValueError(f"--images {images}: at least one image is needed")
    loaded = load_encoders(checkpoints, recipe)
    cfg = loaded[0][1]
    names = list(labels) or [label_for(c) for c in checkpoints]
    if len(names) != len(checkpoints):
        raise ValueError(f"--labels: {len(names)} labels for {len(checkpoints)} checkpoints")
    stats = [AttentionStats(e.depth, e.num_heads, e.patch_embed.grid_size, e.patch_embed.patch_size) for e, _, _ in loaded]
    with _progress(images, "attention") as bar:
        for x in image_batches(cfg, data, images, batch):
            for (enc, _, _), st in zip(loaded, stats):
                st.update(encoder_attention(enc, x))
            bar.update(x.shape[0])
    models = [{"checkpoint": ck, "label": n, "import": r, "patch_size": e.patch_embed.patch_size, **st.result()}
              for ck, n, (e, _, r), st in zip(checkpoints, names, loaded, stats)]
    res = {"data": str(data), "images": stats[0].images, "models": models}
    png = Path(out_png or "attention.png")
    plots.attention_figure(models, png, f"{res['images']} images of {_short(data)}")
    res["png"] = str(png)
    res["json"] = str(_write(res, png))
    return res


def _write(res: dict, png: Path) -> Path:
    path = png.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return path


def summary_lines(res: dict) -> List[str]:
    """What the CLI prints: the CKA diagonal, or each model's per-layer mean distance and entropy."""
    if "cka" in res:
        m = torch.tensor(res["cka"])
        n = min(m.shape)
        diag = " ".join(f"{m[i, i]:.2f}" for i in range(n))
        return [f"CKA {res['label_a']} (rows, {m.shape[0]} representations) vs {res['label_b']} (columns, "
                f"{m.shape[1]}) on {res['images']} images", f"diagonal: {diag}"]
    lines = [f"attention on {res['images']} images: per layer, mean over heads of distance (px) / entropy (nats)"]
    for m in res["models"]:
        d = torch.tensor(m["distance_px"]).mean(1)
        e = torch.tensor(m["entropy"]).mean(1)
        lines.append(f"{m['label']:>16s}: " + " ".join(f"{a:.1f}/{b:.2f}" for a, b in zip(d.tolist(), e.tolist())))
    return lines


def _short(path: str) -> str:
    """The last two parts of a data path (fmnist/test), for figure titles."""
    return "/".join(Path(path).parts[-2:])
