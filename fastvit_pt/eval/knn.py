"""Weighted k-NN classification on frozen features (k=20, cosine similarity, temperature 0.07), the
protocol of DINO and of mae-lite's analysis: each of the k nearest training samples votes for its class
with weight exp(similarity / T)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, max_batches: int | None = None,
                     desc: str | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features of every image the loader yields: ([N, D] float32, [N] int64), on the host.
    `encoder` is a VisionTransformer (its own pooling: cls token, or the patch average with fc_norm).
    desc: show a progress bar with this label."""
    from ..engine.metrics import Progress

    encoder.eval()
    feats, labels = [], []
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    bar = Progress(desc is not None, total, desc or "")
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        f = encoder.forward_head(encoder.forward_features(batch.images), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(batch.labels.cpu())
        bar.update(1)
    bar.close()
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [M, num_classes] for each test feature: the weighted votes of its k nearest neighbours."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, train_feats.shape[0])
    bank = F.normalize(train_feats.float(), dim=1)
    out = []
    for start in range(0, test_feats.shape[0], chunk):  # [chunk, N] similarities at a time
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """{"top1": %, "top5": %} (a k larger than the class count counts every sample as correct)."""
    order = scores.argsort(dim=1, descending=True)
    hits = order == labels[:, None]
    return {f"top{k}": round(100.0 * hits[:, :k].any(dim=1).float().mean().item(), 2) for k in ks}


def backbone_features(checkpoint: str, train_data: str, test_data: str, cfg, batch: int):
    """Frozen features of the backbone in `checkpoint` on two data sets (class-folder trees or .beton files,
    evaluation crops), read as `cfg` says (`eval_config`): the encoder `cfg.model.name` (an mae_* name means its
    encoder) at its image and patch size, images normalised with cfg.data.mean / std on cfg.engine.device.
    checkpoint="scratch" is the randomly initialised encoder (drawn from cfg.train.seed), the baseline a
    pre-training must beat. Returns (train, test, class count, info)."""
    from ..distributed.env import pick_device
    from .checkpoints import image_loader, load_encoder

    m, seed = cfg.model, cfg.train.seed
    name = m.name.removeprefix("mae_")
    dev = pick_device(cfg.engine.device)
    encoder, report = load_encoder(checkpoint, cfg)
    encoder.to(dev)

    def features(path: str):
        loader = image_loader(cfg, path, batch, dev)
        return extract_features(encoder, loader, desc=f"features {path}"), len(loader.classes)

    (xtr, ytr), n_classes = features(train_data)
    (xte, yte), _ = features(test_data)
    n_classes = max(n_classes, int(ytr.max()) + 1, int(yte.max()) + 1)
    info = {"train_images": len(ytr), "test_images": len(yte), "model": name, "img_size": m.img_size,
            "patch_size": m.patch_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std), "seed": seed,
            "checkpoint": str(checkpoint), "import": str(report)}
    return (xtr, ytr), (xte, yte), n_classes, info


def describe_inputs(info: dict) -> str:
    """One line: what the backbone was fed (printed by knn and linprobe, so a mismatch is visible)."""
    fmt = lambda v: "[" + ", ".join(f"{x:g}" for x in v) + "]"  # noqa: E731
    return (f"{info['model']} at {info['img_size']} px (patch {info['patch_size']}), normalised with mean "
            f"{fmt(info['mean'])} std {fmt(info['std'])}; from {info['config']}")


def evaluate_knn(checkpoint: str, train_data: str, test_data: str, cfg, origin: str = "") -> dict:
    """k-NN top-1/top-5 (cfg.knn: k, temperature) of the backbone in `checkpoint` (any layout `load_backbone`
    reads): features of `train_data` are the bank, `test_data` is scored."""
    k, temperature = cfg.knn.k, cfg.knn.temperature
    (xtr, ytr), (xte, yte), n_classes, info = backbone_features(checkpoint, train_data, test_data, cfg, cfg.knn.batch)
    acc = topk_accuracy(knn_predict(xtr, ytr, xte, n_classes, k, temperature), yte)
    return {**acc, "k": k, "temperature": temperature, **info, "config": origin}
