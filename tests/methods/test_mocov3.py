"""MoCo-v3 against facebookresearch/moco-v3's definitions: the loss, the momentum schedule, the MLPs, the
rank-synchronised BatchNorm, and a backbone that loads into timm and is found in the checkpoint."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_mae_overrides
from fastvit_pt.config import load_config
from fastvit_pt.methods.configs import MoCoV3Config
from fastvit_pt.methods.mocov3 import MoCoV3, RankSyncedBatchNorm1d, build_mlp
from fastvit_pt.models import create_model
from pipelines.base import Batch


def _method(**kw):
    torch.manual_seed(0)
    enc = create_model("vit_test", img_size=28, patch_size=4, num_classes=0, pos_embed="sincos", attn_impl="math")
    return MoCoV3(enc, MoCoV3Config(mlp_dim=64, dim=16, **kw))


def test_contrastive_loss_is_mocov3s():
    """moco-v3 builder.py contrastive_loss: normalise, logits q.k^T / T, labels = arange(N) (+ N x rank),
    cross-entropy x 2T."""
    m = _method()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = torch.einsum("nc,mc->nm", qn, kn) / 0.2
    want = F.cross_entropy(logits, torch.arange(6)) * 2 * 0.2
    torch.testing.assert_close(m.contrastive(q, k), want)


def test_momentum_follows_the_half_cosine_and_the_ema_formula():
    m = _method(momentum=0.99)
    assert m.after_step(0, 100)["momentum"] == pytest.approx(0.99)
    assert m.after_step(50, 100)["momentum"] == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 2)) * 0.01)
    with torch.no_grad():
        for p in m.base_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.key_encoder.parameters()]
    mom = m.after_step(100, 100)["momentum"]
    assert mom == pytest.approx(1.0)
    for b, p in zip(before, m.key_encoder.parameters()):  # m = 1: the key encoder keeps its weights
        torch.testing.assert_close(p, b)
    mom = m.after_step(10, 100)["momentum"]
    online = list(m.base_encoder.parameters()) + list(m.projector.parameters())
    for b, p, o in zip(before, m.key_encoder.parameters(), online):
        torch.testing.assert_close(p, b * mom + o * (1 - mom))


def test_mlps_are_mocov3s_build_mlp():
    proj = build_mlp(3, 32, 64, 16)
    kinds = [type(x).__name__ for x in proj]
    assert kinds == ["Linear", "RankSyncedBatchNorm1d", "ReLU", "Linear", "RankSyncedBatchNorm1d", "ReLU", "Linear",
                     "RankSyncedBatchNorm1d"]
    assert all(x.bias is None for x in proj if isinstance(x, nn.Linear)) and not proj[-1].affine
    pred = build_mlp(2, 16, 64, 16, last_bn=False)
    assert [type(x).__name__ for x in pred] == ["Linear", "RankSyncedBatchNorm1d", "ReLU", "Linear"]


@pytest.mark.parametrize("training", [True, False])
def test_one_rank_batchnorm_is_torchs(training):
    torch.manual_seed(0)
    ours, ref = RankSyncedBatchNorm1d(8), nn.BatchNorm1d(8)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(32, 8) * 3 + 1
    for _ in range(3):
        ours.train(training), ref.train(training)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_the_patch_projection_is_frozen_and_views_are_required():
    m = _method()
    assert not any(p.requires_grad for p in m.base_encoder.patch_embed.parameters())
    x = torch.randn(4, 3, 28, 28)
    with pytest.raises(ValueError, match="needs two views"):
        m(Batch(x, torch.zeros(4, dtype=torch.long)))
    out = m(Batch(x, torch.zeros(4, dtype=torch.long), more_views=[x.flip(-1)]))
    assert torch.isfinite(out["loss"])


def test_backbone_loads_into_timm_and_is_found_in_the_checkpoint(fmnist_small, tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from fastvit_pt.engine.backbone import read_backbone
    from fastvit_pt.engine.checkpoint import model_path
    from fastvit_pt.engine.loop import train

    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"method.name": "mocov3", "train.epochs": 1})
    res = train(load_config(None, over + ["method.mlp_dim=64", "method.dim=16"]))
    exported = torch.load(model_path(tmp_path / "run", 1), weights_only=True)
    timm_vit = TimmViT(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    timm_vit.load_state_dict(exported)  # strict: every key, every shape
    from_ckpt, desc, ignored = read_backbone(res.checkpoint)  # the prefix the checkpoint records: base_encoder.
    assert from_ckpt.keys() == exported.keys() and "projector" in ignored and "predictor" in ignored
    for k, v in exported.items():
        torch.testing.assert_close(from_ckpt[k].float(), v)
