"""Which config a checkpoint is evaluated with (knn, linprobe): its run's own, a recipe's, or the defaults."""
from __future__ import annotations

from typing import Optional, Sequence

from ..engine.backbone import run_config


def eval_config(checkpoint: str, recipe: Optional[str] = None, overrides: Sequence[str] = ()):
    """(Config, where its base came from) for evaluating `checkpoint` the way its backbone was trained: the run's
    own config (model, image and patch size, data.mean / data.std, ...) where the checkpoint is ours, else
    `recipe`, else the code defaults (ViT-Tiny/16 at 224 px, ImageNet statistics); `recipe` also replaces a run's
    config when given. KEY=VALUE `overrides` apply last (knn.k=10, data.mean=[...], engine.device=cpu)."""
    from ..config import Config, apply_overrides, load_config

    if recipe:
        cfg, origin = load_config(recipe), f"recipe {recipe}"
    else:
        cfg = None if checkpoint == "scratch" else run_config(checkpoint)
        origin = f"the run's config (beside {checkpoint})" if cfg else "code defaults (no run config: pass --recipe)"
        cfg = cfg or Config()
    cfg = apply_overrides(cfg, list(overrides))
    if overrides:
        origin += ", with " + " ".join(overrides)
    return cfg, origin
