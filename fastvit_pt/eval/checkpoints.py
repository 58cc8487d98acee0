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


def load_encoder(checkpoint: str, cfg):
    """(the frozen encoder in `checkpoint`, how it was imported): the VisionTransformer `cfg.model.name` names (an
    mae_* name means its encoder) at cfg's image and patch size, its weights from any layout `load_backbone` reads;
    checkpoint="scratch" is that encoder as initialised from cfg.train.seed, the baseline a pre-training must beat."""
    import torch

    from ..engine.backbone import load_backbone
    from ..models import create_model

    m, seed = cfg.model, cfg.train.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = create_model(m.name.removeprefix("mae_"), img_size=m.img_size, patch_size=m.patch_size,
                               in_chans=m.in_chans, num_classes=0)
    report = f"random initialisation (seed {seed})" if checkpoint == "scratch" else load_backbone(encoder, checkpoint)
    return encoder.eval(), report


def image_loader(cfg, path: str, batch: int, device, shuffle: bool = False):
    """Evaluation crops (resize, center crop, no augmentation) of `path` (a class-folder tree or a .beton: FFCV),
    normalised with cfg.data.mean / std at cfg.model.img_size; in file order, or shuffled by cfg.train.seed."""
    import dataclasses

    import pipelines

    pcfg = dataclasses.replace(cfg.data, backend=pipelines.backend_for(path), path=str(path), randaugment="")
    return pipelines.build_loader(pcfg, img_size=cfg.model.img_size, batch_size=batch, seed=cfg.train.seed,
                                  device=device, train=False, drop_last=False, shuffle=shuffle)
