"""MAE reconstructions as a PNG grid, one row per image:
original | masked input | reconstruction | reconstruction with the visible patches pasted back."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import config_from_dict
from ..engine.checkpoint import load_checkpoint, method_state_dict, resolve_checkpoint


def save_reconstructions(
    checkpoint: str | Path, out_png: Optional[str | Path] = None, data_path: Optional[str] = None, num: int = 8, seed: int = 0
) -> Path:
    import pipelines

    from ..methods import build_standalone
    from ..models import MaskedAutoencoderViT

    ckpt_path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(ckpt_path)
    cfg = config_from_dict(state["config"])
    method = build_standalone(cfg, attn_impl="sdpa")
    mae = getattr(method, "model", None)
    if not isinstance(mae, MaskedAutoencoderViT):
        raise ValueError(f"{ckpt_path} was trained with method {cfg.method.name!r}, which reconstructs nothing; "
                         "fastvit analyze recon is for MAE-family runs (mae, dmae, d2mae)")
    method.load_state_dict({k: v.float() for k, v in method_state_dict(ckpt_path, state).items()})
    method.eval()
    if data_path:  # a folder is read with the reference loader, a .beton with ffcv, whatever the run used
        cfg.data.path = data_path
        cfg.data.backend = pipelines.backend_for(data_path)
    cfg.data.workers = 0
    # evaluation crops, but a seeded shuffle: the first images of a class-sorted folder are all one class
    loader = pipelines.build_loader(cfg.data, img_size=cfg.model.img_size, batch_size=num, seed=seed, train=False,
                                    drop_last=False, shuffle=True)
    batch = next(iter(loader))
    torch.manual_seed(seed)
    with torch.no_grad():
        imgs = batch.images.float()
        enc = mae.forward_encoder(imgs, cfg.method.mask_ratio)
        pred = mae.forward_decoder(enc.latent, enc.ids_restore)
        target = mae.patchify(imgs)
        if mae.norm_pix_loss:  # the model predicts normalised patches: bring back each patch's own statistics
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = enc.mask.unsqueeze(-1)
        recon = mae.unpatchify(pred)
        masked = mae.unpatchify(target * (1 - m))
        pasted = mae.unpatchify(target * (1 - m) + pred * m)
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        x = (x * std + mean).clamp(0, 1) * 255
        return x.round().byte().permute(0, 2, 3, 1).numpy()

    cols = [to_uint8(t) for t in (imgs, masked, recon, pasted)]
    rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(imgs.shape[0])]
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 256 // cfg.model.img_size)  # 28-px images are unreadable at 1:1
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    from PIL import Image

    out = Path(out_png) if out_png else ckpt_path.parent / "recon.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    return out
