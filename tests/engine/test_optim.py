import math

import pytest
import torch

from fastvit_pt.engine.optim import WarmupCosine, build_adamw, param_groups
from fastvit_pt.models import create_model


def test_no_weight_decay_on_biases_norms_and_1d():
    m = create_model("mae_vit_test", img_size=32, patch_size=8)
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(".bias") or "norm" in n for n in undecayed), undecayed
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "encoder.blocks.0.norm1.weight" in undecayed
    assert "encoder.patch_embed.proj.weight" in decayed
    # frozen sin-cos position embeddings are in no group at all
    assert not any("pos_embed" in n for n in decayed | undecayed)
    fine = param_groups(create_model("vit_test", img_size=32), 0.05, skip=("pos_embed", "cls_token"))
    assert {names_ for names_ in ("pos_embed", "cls_token")} <= {
        n for n, p in create_model("vit_test", img_size=32).named_parameters()}
    assert len(fine[1]["params"]) == len(param_groups(create_model("vit_test", img_size=32), 0.05)[1]["params"]) + 2


def test_adamw_betas_and_impl():
    m = torch.nn.Linear(4, 4)
    opt = build_adamw(param_groups(m, 0.05), 1e-3, (0.9, 0.95), 1e-8, torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["foreach"] is True


def test_warmup_then_cosine():
    s = WarmupCosine(peak=1.0, total=100, warmup=10, floor=0.1)
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(100) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_layer_decay_scales_for_depth_12_and_decay_0_85():
    from fastvit_pt.engine.optim import layer_decay_groups, set_lr
    from fastvit_pt.models import create_model

    vit = create_model("vit_tiny_patch16", global_pool="avg", num_classes=10)
    groups = layer_decay_groups(vit, 0.05, 0.85, depth=12)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["cls_token"] == scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.85**13
    for i in range(12):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == scale[f"blocks.{i}.norm1.bias"] == 0.85 ** (12 - i)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert round(0.85**13, 6) == 0.120905 and round(0.85**12, 6) == 0.142242  # the values written out
    assert wd["blocks.0.attn.qkv.weight"] == wd["head.weight"] == wd["patch_embed.proj.weight"] == 0.05
    assert wd["cls_token"] == wd["pos_embed"] == wd["blocks.3.mlp.fc1.bias"] == wd["fc_norm.weight"] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in vit.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1.0)
    set_lr(opt, 1e-3)
    lrs = {n: pg["lr"] for pg, g in zip(opt.param_groups, groups) for n in g["names"]}
    assert lrs["head.bias"] == 1e-3 and lrs["pos_embed"] == 1e-3 * 0.85**13


def test_sgd_with_nesterov_for_transfer_and_names_stripped():
    from fastvit_pt.config import load_config
    from fastvit_pt.engine.optim import build_optimizer, layer_decay_groups

    o = load_config("recipes/transfer_tiny.yaml").optim
    vit = create_model("vit_test", img_size=32, num_classes=5)
    opt = build_optimizer(layer_decay_groups(vit, o.weight_decay, 0.75, vit.depth), o, 0.02, torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert all(g["weight_decay"] == 0.0 and "names" not in g for g in opt.param_groups)
    assert o.clip_grad == 1.0
    assert sorted({g["lr_scale"] for g in opt.param_groups}) == pytest.approx([0.75 ** k for k in (3, 2, 1, 0)])
