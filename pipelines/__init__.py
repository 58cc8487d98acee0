"""Standalone data pipelines. Never imports fastvit_pt; each backend file is the only importer of its library.

    loader = build_loader(cfg, img_size=224, batch_size=64, device="cuda", dtype=torch.bfloat16)
    for batch in loader: ...   # Batch(images=[N, 3, 224, 224] normalised on the device, labels=[N], keys=[N])

Several crops of each sample (self-supervised methods): views=[ViewConfig(...), ...], one tensor per view in
Batch.views (view 0 is Batch.images), photometric ops per view on the device (pipelines.photometric).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from .config import BACKENDS, PipelineConfig, ViewConfig, backend_for

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import Loader

__all__ = ["BACKENDS", "PipelineConfig", "ViewConfig", "backend_for", "build_loader"]


def build_loader(
    cfg: PipelineConfig,
    *,
    img_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device="cpu",
    dtype: "torch.dtype | None" = None,
    train: bool = True,
    drop_last: bool = True,
    shuffle: "bool | None" = None,
    views: Optional[Sequence[ViewConfig]] = None,
) -> "Loader":
    """Build the configured backend. Heavy libraries are imported here, only for the backend asked for.
    train picks the augmentation (training crops vs resize + center crop); shuffle defaults to train.
    views: None = one view as cfg describes it (img_size); else one output per ViewConfig, in Batch.views, each
    cropped from the same sample (evaluation: each a centre crop at its size, no photometric ops)."""
    import torch

    cfg.validate()
    from .base import LoaderArgs
    from .config import resolve_views

    resolved = tuple(resolve_views(cfg, views, img_size))

    args = LoaderArgs(
        img_size=img_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=torch.device(device),
        dtype=dtype or torch.float32,
        train=train,
        drop_last=drop_last,
        shuffle=train if shuffle is None else shuffle,
        views=resolved,
    )
    if cfg.backend == "torchvision":
        from .torchvision_loader import TorchvisionLoader

        return TorchvisionLoader(cfg, args)
    if cfg.backend == "ffcv":
        try:
            from .ffcv_loader import FfcvLoader
        except ImportError as err:
            raise ImportError(f"data.backend=ffcv needs FFCV ({err}); install it with: pip install 'fastvit_pt[ffcv]'") from err
        return FfcvLoader(cfg, args)
    if cfg.backend == "dali":
        try:
            from .dali_loader import DaliLoader
        except ImportError as err:
            raise ImportError(
                f"data.backend=dali needs NVIDIA DALI ({err}); install it with: pip install 'fastvit_pt[dali]'"
            ) from err
        return DaliLoader(cfg, args)
    if cfg.backend == "turbo":
        try:
            from .turbo_loader import TurboLoader
        except ImportError as err:
            raise ImportError(f"data.backend=turbo needs the crop decoder: {err}") from err
        return TurboLoader(cfg, args)
    raise AssertionError(f"unreachable: PipelineConfig.validate() accepted backend {cfg.backend!r}")
