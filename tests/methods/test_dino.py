"""DINO against facebookresearch/dino's definitions: DINOLoss (centre, temperatures), the schedules, the head with
its weight-normalised last layer, the multi-crop wrapper, the crops it asks for, the frozen last layer, the
per-parameter clipping and the weight-decay cosine; and a backbone that loads into timm."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_mae_overrides
from fastvit_pt.config import ConfigError, load_config
from fastvit_pt.engine.optim import CosineValue, build_optimizer, clip_per_parameter_, set_lr
from fastvit_pt.methods.configs import DINOConfig
from fastvit_pt.methods.dino import DINO, DINOHead, MultiCrop
from fastvit_pt.models import create_model
from pipelines.base import Batch

SMALL = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_size=12)


def _vit(drop_path=0.0):
    return create_model("vit_test", img_size=28, patch_size=4, num_classes=0, attn_impl="math",
                        drop_path_rate=drop_path)


def _method(steps_per_epoch=10, **kw):
    torch.manual_seed(0)
    return DINO(_vit(0.1), _vit(), DINOConfig(**{**SMALL, **kw}), steps_per_epoch)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """dino utils.py cosine_scheduler, verbatim."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


class RefDINOLoss(nn.Module):
    """dino main_dino.py DINOLoss, one process (no all_reduce)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total_loss


def test_loss_and_centre_are_dino_loss_over_epochs():
    m = _method(steps_per_epoch=3, warmup_teacher_temp_epochs=4)
    ref = RefDINOLoss(64, 4, 0.04, 0.07, 4, nepochs=6)
    g = torch.Generator().manual_seed(0)
    for step in range(15):  # through the warm-up (epochs 0-3) and after it
        m.steps_done = step
        s, t = torch.randn(4 * 5, 64, generator=g), torch.randn(2 * 5, 64, generator=g) * 3
        torch.testing.assert_close(m.loss(s, t), ref(s, t, step // 3), rtol=1e-5, atol=1e-6)
        m.update_center()  # after the optimizer step (the engine's after_step)
        torch.testing.assert_close(m.teacher.center, ref.center, rtol=1e-5, atol=1e-7)
    assert m.teacher_temp() == pytest.approx(0.07)


def test_centre_follows_the_global_batch_at_any_accumulation():
    """Two micro-batches of 5 then one update == one batch of 10 (DINO's update at the global batch)."""
    a, b = _method(), _method()
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4 * 10, 64, generator=g), torch.randn(2 * 10, 64, generator=g) * 3
    a.loss(s, t)
    a.update_center()
    rows = lambda x, k, sl: torch.cat([c[sl] for c in x.chunk(k)])  # noqa: E731  crop-major halves of the batch
    for half in (slice(0, 5), slice(5, 10)):
        b.loss(rows(s, 4, half), rows(t, 2, half))
    b.update_center()
    torch.testing.assert_close(a.teacher.center, b.teacher.center)
    assert a.teacher.center.abs().sum() > 0 and not b.teacher.pending.any()
    before = b.teacher.center.clone()
    b.update_center()  # nothing pending: the centre stays
    assert torch.equal(before, b.teacher.center)


def test_teacher_temperature_warms_up_per_epoch_as_linspace():
    m = _method(steps_per_epoch=5, warmup_teacher_temp_epochs=30)
    want = np.linspace(0.04, 0.07, 30)
    assert m.teacher.temp.item() == pytest.approx(0.04)
    for epoch in (0, 1, 17, 29, 30, 100):
        m.steps_done = epoch * 5 + 4  # the last step of the epoch still reads that epoch's value
        assert m.teacher_temp() == pytest.approx(want[epoch] if epoch < 30 else 0.07)
        assert m.teacher.temp.item() == pytest.approx(m.teacher_temp())  # the tensor the loss reads follows


def test_momentum_and_weight_decay_follow_dinos_cosine_scheduler():
    epochs, niter = 4, 7
    mom = cosine_scheduler(0.996, 1, epochs, niter)
    wd = cosine_scheduler(0.04, 0.4, epochs, niter)
    for it in range(epochs * niter):
        assert CosineValue(0.996, 1.0, epochs * niter)(it) == pytest.approx(mom[it], abs=1e-12)
        assert CosineValue(0.04, 0.4, epochs * niter)(it) == pytest.approx(wd[it], abs=1e-12)
    m = _method()
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.teacher.parameters()]
    out = m.after_step(3, epochs * niter)  # after optimizer step 3 (1-based): momentum_schedule[2]
    assert out["momentum"] == pytest.approx(mom[2])
    for b, p, o in zip(before, m.teacher.parameters(), m.student.parameters()):
        torch.testing.assert_close(p, b * mom[2] + o.detach() * (1 - mom[2]))


def test_head_is_dinos_with_a_weight_normalised_last_layer():
    torch.manual_seed(0)
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16, layers=3, norm_last_layer=True)
    assert [type(x).__name__ for x in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    last = head.last_layer
    assert not last.weight_g.requires_grad and torch.equal(last.weight_g, torch.ones(64, 1))
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(16, 64, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(last.weight_g)
        ref.parametrizations.weight.original1.copy_(last.weight_v)
    x = torch.randn(5, 32)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), ref(z))
    assert DINOHead(32, 64, 48, 16, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_multicrop_runs_each_crop_as_if_alone():
    torch.manual_seed(0)
    net = MultiCrop(_vit(), DINOHead(32, 64, 32, 16)).eval()
    crops = [torch.randn(3, 3, 28, 28), torch.randn(3, 3, 28, 28), torch.randn(3, 3, 12, 12), torch.randn(3, 3, 12, 12)]
    out = net(crops)
    assert out.shape == (12, 64)
    alone = torch.cat([net.head(net.backbone(c)) for c in crops])
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)


def test_views_are_two_global_and_n_local_crops():
    views = DINOConfig(local_crops=3, local_size=96).views()
    assert len(views) == 5
    assert [v.size for v in views] == [0, 0, 96, 96, 96]  # 0: the model's img_size
    assert [v.crop_scale for v in views] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 3
    assert [v.blur for v in views] == [1.0, 0.1, 0.5, 0.5, 0.5]
    assert [v.solarize for v in views] == [0.0, 0.2, 0.0, 0.0, 0.0]
    assert all(v.color_jitter == 0.8 and v.grayscale == 0.2 for v in views)


def test_forward_needs_the_declared_crops():
    m = _method()
    x, small = torch.randn(4, 3, 28, 28), torch.randn(4, 3, 12, 12)
    with pytest.raises(ValueError, match="2 global \\+ 2 local crops"):
        m(Batch(x, torch.zeros(4, dtype=torch.long), more_views=[x]))
    out = m(Batch(x, torch.zeros(4, dtype=torch.long), more_views=[x.flip(-1), small, small.flip(-1)]))
    assert torch.isfinite(out["loss"])


def test_last_layer_is_frozen_for_the_first_epochs_only():
    m = _method(steps_per_epoch=3, freeze_last_layer=1)
    o = load_config(None, ["optim.weight_decay=0.04"]).optim
    opt = build_optimizer(m.param_groups(0.04), o, 1e-2, torch.device("cpu"))
    last = m.student.head.last_layer.weight_v
    frozen = [g for g in opt.param_groups if g.get("frozen_steps")]
    assert len(frozen) == 1 and frozen[0]["frozen_steps"] == 3 and any(p is last for p in frozen[0]["params"])
    x, small = torch.randn(4, 3, 28, 28), torch.randn(4, 3, 12, 12)
    batch = Batch(x, torch.zeros(4, dtype=torch.long), more_views=[x.flip(-1), small, small.flip(-1)])
    moved = []
    for step in range(5):
        before, other = last.detach().clone(), m.student.head.mlp[0].weight.detach().clone()
        set_lr(opt, 1e-2, step)
        m(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(other, m.student.head.mlp[0].weight)
        moved.append(not torch.equal(before, last))
    assert moved == [False, False, False, True, True]


def test_per_parameter_clipping_is_dinos_clip_gradients():
    torch.manual_seed(0)
    a, b = [nn.Linear(8, 8) for _ in range(2)]
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 8) * 10
    for net in (a, b):
        net(x).pow(2).sum().backward()
    total = clip_per_parameter_(a.parameters(), 3.0)
    norms = []
    for p in b.parameters():  # dino utils.clip_gradients
        param_norm = p.grad.data.norm(2)
        norms.append(param_norm.item())
        clip_coef = 3.0 / (param_norm + 1e-6)
        if clip_coef < 1:
            p.grad.data.mul_(clip_coef)
    assert max(norms) > 3.0  # something was clipped
    assert total.item() == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_weight_decay_schedule_reaches_decayed_groups_only(fmnist_small, tmp_path):
    from fastvit_pt.distributed.env import DistEnv
    from fastvit_pt.engine.loop import build_training

    over = tiny_mae_overrides(fmnist_small / "train", tmp_path, **{"optim.weight_decay": 0.04,
                                                                    "optim.weight_decay_end": 0.4})
    _, _, engine, plan = build_training(load_config(None, over), DistEnv())
    for step in (0, plan.total_steps // 2, plan.total_steps - 1):
        engine.global_step = step
        engine._set_lr_for_this_step()
        decays = sorted({g["weight_decay"] for g in engine.optimizer.param_groups})
        assert decays == [0.0, pytest.approx(CosineValue(0.04, 0.4, plan.total_steps)(step))]


def test_deepspeed_refuses_per_parameter_clipping(fmnist_small, tmp_path):
    from fastvit_pt.engine.loop import train

    over = tiny_mae_overrides(fmnist_small / "train", tmp_path, **{"engine.kind": "deepspeed", "optim.clip_grad": 3.0,
                                                                    "optim.clip_mode": "param"})
    with pytest.raises(ConfigError, match="clip_mode=param"):
        train(load_config(None, over))
    with pytest.raises(ConfigError, match="optim.clip_mode"):
        load_config(None, ["optim.clip_mode=value"])
    with pytest.raises(ConfigError, match="optim.weight_decay_end=0.4 needs optim.weight_decay > 0"):
        load_config(None, ["optim.weight_decay=0", "optim.weight_decay_end=0.4"])
    with pytest.warns(UserWarning, match="clip_mode=param has no effect"):
        load_config(None, ["optim.clip_mode=param"])
    with pytest.raises(ConfigError, match="method.local_size must be >= 1"):
        load_config(None, ["method.name=dino", "method.local_size=0"])


def test_local_size_must_fit_the_patches(fmnist_small, tmp_path):
    from fastvit_pt.methods import build_standalone

    cfg = load_config(None, tiny_mae_overrides(fmnist_small / "train", tmp_path, **{"method.name": "dino",
                                                                                     "method.local_size": 10}))
    with pytest.raises(ValueError, match="method.local_size=10 is not a multiple of model.patch_size=4"):
        build_standalone(cfg, num_classes=10)


def test_backbone_loads_into_timm_and_the_teacher_is_in_the_checkpoint(fmnist_small, tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from fastvit_pt.engine.backbone import read_backbone
    from fastvit_pt.engine.checkpoint import load_checkpoint, model_path
    from fastvit_pt.engine.loop import train

    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"method.name": "dino", "train.epochs": 1})
    res = train(load_config(None, over + [f"method.{k}={v}" for k, v in SMALL.items()]))
    exported = torch.load(model_path(tmp_path / "run", 1), weights_only=True)
    timm_vit = TimmViT(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    timm_vit.load_state_dict(exported)  # strict: every key, every shape
    from_ckpt, _, ignored = read_backbone(res.checkpoint)  # the prefix the checkpoint records: student.backbone.
    assert from_ckpt.keys() == exported.keys() and ignored == {"student": 8}  # the head's 8 tensors
    teacher = load_checkpoint(res.checkpoint)["engine"]["held"]["teacher"]
    assert {k.removeprefix("backbone.") for k in teacher if k.startswith("backbone.")} == exported.keys()
    assert teacher["center"].shape == (1, 64) and teacher["center"].abs().sum() > 0


def test_gradient_accumulation_equals_the_whole_batch(fmnist_small, tmp_path):
    """micro-batch 50 x 2 accumulated == one micro-batch of 100: the loss, the teacher's centre (updated once per
    optimizer step from every micro-batch) and the weights. Adam's eps raised as in the 2-rank contract test."""
    from launchers import assert_same_run

    from fastvit_pt.engine.loop import seed_everything, train

    runs = {}
    for micro in (100, 50):
        seed_everything(0)
        out = tmp_path / f"micro{micro}"
        over = tiny_mae_overrides(fmnist_small / "train", out, **{"method.name": "dino", "train.epochs": 1,
                                                                   "train.micro_batch": micro, "optim.eps": 1e-4})
        runs[micro] = train(load_config(None, over + [f"method.{k}={v}" for k, v in SMALL.items()]))
    assert_same_run(tmp_path / "micro50", tmp_path / "micro100")
    from fastvit_pt.engine.checkpoint import load_checkpoint

    a, b = (load_checkpoint(runs[m].checkpoint)["engine"]["held"]["teacher"]["center"] for m in (100, 50))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
