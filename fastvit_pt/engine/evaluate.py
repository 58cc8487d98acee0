"""Evaluation during training: top-1 / top-5 and the loss of a classifying method on held-out images
(resize to img_size / 0.875, center crop: 256 -> 224 at ImageNet scale), summed over the ranks; the best
epoch's weights are kept as `model-best.pt` beside `best.json`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..config import Config
from ..distributed.env import DistEnv
from .metrics import Progress

BEST_MODEL, BEST_META = "model-best.pt", "best.json"


def build_eval_loader(cfg: Config, env: DistEnv, dtype: torch.dtype, path: Optional[str] = None,
                      shuffle: bool = False):
    """The evaluation-crop loader of `path` (default eval.path) on this rank (its 1/world_size share; in file order,
    or shuffled by train.seed), or None when there is no path. A .beton is read with FFCV; a folder with the run's
    own backend where it reads folders (torchvision, dali, turbo), else with torchvision."""
    path = cfg.eval.path if path is None else path
    if not path:
        return None
    import dataclasses

    import pipelines

    pcfg = dataclasses.replace(cfg.data, backend=pipelines.backend_for(path, cfg.data.backend), path=path,
                               randaugment="")
    return pipelines.build_loader(pcfg, img_size=cfg.model.img_size, batch_size=cfg.eval.micro_batch, rank=env.rank,
                                  world_size=env.world_size, seed=cfg.train.seed, device=env.device, dtype=dtype,
                                  train=False, drop_last=False, shuffle=shuffle)


@torch.no_grad()
def evaluate(engine, loader, env: DistEnv, desc: str = "eval") -> Dict[str, float]:
    """{"top1": %, "top5": %, "loss": mean cross-entropy, "images": count} over every rank's share of `loader`.
    The model is the method's backbone (its classifier), run in the engine's compute dtype."""
    model = engine.method.encoder()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # correct@1, correct@5, loss sum, images
    bar = Progress(env.is_main, len(loader), desc)
    try:
        for batch in loader:
            with engine.autocast, engine.kernels():
                logits = model(batch.images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == batch.labels[:, None]
            sums += torch.stack([
                hits[:, :1].any(dim=1).sum(), hits.any(dim=1).sum(),
                F.cross_entropy(logits, batch.labels, reduction="sum"), torch.tensor(len(batch), device=env.device),
            ]).double()
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if env.distributed:
        torch.distributed.all_reduce(sums)
    c1, c5, loss, n = sums.tolist()
    if n == 0:
        raise ValueError("evaluation: the eval loader yielded no images")
    return {"top1": round(100 * c1 / n, 2), "top5": round(100 * c5 / n, 2), "loss": round(loss / n, 4), "images": int(n)}


def read_best(run_dir: Path) -> Optional[Dict]:
    p = Path(run_dir) / BEST_META
    return json.loads(p.read_text()) if p.is_file() else None


def write_best(run_dir: Path, best: Dict) -> None:
    p = Path(run_dir) / BEST_META
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(best, indent=1))
    tmp.replace(p)
