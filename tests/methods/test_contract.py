"""The method contract, checked for every registered method (solo-learn / timm style: iterate the registry).

Each method runs on the test-size model with the views it declares, with the few settings a small run needs
applied where its section has them (a random teacher, a scratch init, narrow MLPs). A new method gets all of
this for free, and a method that breaks the contract fails here:
- a finite loss and a gradient on every trainable parameter;
- after_step moves its EMA modules and nothing else (no parameter, no frozen module);
- its EMA modules survive a checkpoint round trip, through the torch and the DeepSpeed engine;
- resume is bit-exact; a 2-rank run equals a 1-rank run at the same global batch.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from launchers import assert_same_run, losses, run, single_cmd, torchrun_cmd

from conftest import tiny_mae_overrides
from fastvit_pt.config import load_config
from fastvit_pt.distributed.env import DistEnv
from fastvit_pt.engine.checkpoint import latest_checkpoint, load_checkpoint
from fastvit_pt.engine.loop import build_training, seed_everything, train
from fastvit_pt.methods.configs import method_names, section_class

# what a seconds-long run of any method needs, set where a method's section has the field
SMALL = {"teacher": "random", "teacher_model": "vit_test", "decoder_block": 1, "init": "scratch", "mlp_dim": 64,
         "dim": 16, "mixup": 0.0, "cutmix": 0.0, "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
         "local_crops": 2, "local_size": 12,
         "mask_patch_size": 4}  # SimMIM at 28 px, 4-px patches: 4 and 28 are the mask cells that tile the image
METHODS = method_names()


def small_settings(name: str) -> list:
    fields = {f.name for f in dataclasses.fields(section_class(name))}
    return [f"method.{k}={v}" for k, v in SMALL.items() if k in fields]


def overrides(name: str, data, out, **extra) -> list:
    return tiny_mae_overrides(data, out, **{"method.name": name, **extra}) + small_settings(name)


def config(name, data, out, **extra):
    return load_config(None, overrides(name, data, out, **extra))


@pytest.fixture(scope="module")
def built(fmnist_small, tmp_path_factory):
    """(loader, method, engine) per method, built once on the test-size model (fp32, CPU)."""
    out = {}
    for name in METHODS:
        seed_everything(0)
        loader, method, engine, _ = build_training(config(name, fmnist_small / "train",
                                                          tmp_path_factory.mktemp(name)), DistEnv())
        out[name] = (loader, method, engine)
    return out


def _first_batch(loader):
    loader.set_epoch(0)
    return next(iter(loader))


@pytest.mark.parametrize("name", METHODS)
def test_loss_is_finite_and_every_trainable_parameter_gets_a_gradient(built, name):
    loader, method, engine = built[name]
    batch = _first_batch(loader)
    views = method.views()
    assert len(batch.views) == (len(views) if views else 1)
    out = engine(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    engine.backward(out["loss"])
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"{name}: no gradient reaches {missing}"
    tree = list(method.modules())
    for held in method.held().values():  # outside the module tree: never wrapped, cast or optimised
        assert all(not p.requires_grad and p.grad is None for p in held.parameters())
        assert not any(held is m for m in tree) and not any(p is q for p in held.parameters()
                                                           for q in method.parameters())
    method.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", METHODS)
def test_after_step_moves_the_ema_and_nothing_else(built, name):
    _, method, engine = built[name]
    params = {k: v.detach().clone() for k, v in method.state_dict().items()}
    held = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in method.held().items()}
    saved = set(method.held_state_dict())
    with torch.no_grad():  # move the online weights, so an EMA has something to follow
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.01)
    moved = {k: v.detach().clone() for k, v in method.state_dict().items()}
    scalars = method.after_step(1, 100)
    assert all(isinstance(v, float) for v in scalars.values())
    for k, v in method.state_dict().items():
        assert torch.equal(v, moved[k]), f"{name}: after_step changed the trainable module's {k}"
    for k, m in method.held().items():
        changed = any(not torch.equal(t, held[k][n]) for n, t in m.state_dict().items())
        assert changed == (k in saved), f"{name}: held module {k} {'did not move' if k in saved else 'moved'}"
    with torch.no_grad():
        for k, v in method.state_dict().items():
            v.copy_(params[k])


def _ema_methods():
    """Methods holding saved (EMA) modules, found by building each one."""
    from fastvit_pt.methods import build_standalone

    out = []
    for name in METHODS:
        cfg = load_config(None, [f"method.name={name}", "model.name=mae_vit_test", "model.img_size=28",
                                 "model.patch_size=4", "engine.precision=fp32", "engine.device=cpu"] + small_settings(name))
        if build_standalone(cfg, num_classes=10).held_state_dict():
            out.append(name)
    return out


EMA_METHODS = _ema_methods()


def test_the_registry_has_an_ema_method():
    assert EMA_METHODS, "no registered method holds an EMA module: the round-trip tests below would test nothing"


@pytest.mark.parametrize("name", EMA_METHODS)
def test_ema_survives_a_torch_checkpoint(fmnist_small, tmp_path, name):
    res = train(config(name, fmnist_small / "train", tmp_path / "run", **{"train.epochs": 1}))
    state = load_checkpoint(res.checkpoint)
    held = state["engine"]["held"]
    assert held and state["engine"]["encoder_prefix"]
    seed_everything(1)  # a differently initialised method: loading must restore the EMA, not keep the new one
    _, method, engine, _ = build_training(config(name, fmnist_small / "train", tmp_path / "other"), DistEnv())
    engine.load(res.checkpoint, state)
    for k, sd in method.held_state_dict().items():
        for n, t in sd.items():
            assert torch.equal(t, held[k][n]) and (t.dtype == torch.float32 or not t.is_floating_point()), (k, n)


@pytest.mark.parametrize("name", EMA_METHODS)
def test_ema_survives_a_deepspeed_checkpoint_in_fp32(fmnist_small, tmp_path, name):
    """DeepSpeed casts the module it wraps to bf16: the EMA is held outside it, stays fp32 and comes back."""
    out = tmp_path / "ds"
    over = overrides(name, fmnist_small / "train", out, **{"train.epochs": 2, "train.stop_after_epochs": 1,
                                                             "engine.kind": "deepspeed", "engine.precision": "bf16"})
    run(single_cmd(*over))
    ckpt = latest_checkpoint(out)
    held = load_checkpoint(ckpt)["engine"]["held"]
    assert held and all(t.dtype == torch.float32 for sd in held.values() for t in sd.values() if t.is_floating_point())
    run(single_cmd(*[o for o in over if not o.startswith("train.stop_after_epochs")], "--resume"))
    assert len(losses(out)) == 10  # both epochs logged: the resumed one ran from the restored EMA


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_exact(fmnist_small, tmp_path, name):
    data = fmnist_small / "train"
    train(config(name, data, tmp_path / "full", **{"train.epochs": 2}))
    train(config(name, data, tmp_path / "part", **{"train.epochs": 2, "train.stop_after_epochs": 1}))
    train(config(name, data, tmp_path / "part", **{"train.epochs": 2}), resume="latest")
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / r))["engine"] for r in ("full", "part"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for m in a["held"]:
        for k in a["held"][m]:
            assert torch.equal(a["held"][m][k], b["held"][m][k]), (m, k)


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_equal_one_rank(fmnist_small, tmp_path, name):
    """Global batch 100: one rank with one micro-batch of 100, two ranks with 50 each (BatchNorm statistics and
    InfoNCE keys then cover the same 100 images). Adam's eps is raised to 1e-4: some gradients are zero in exact
    arithmetic (key biases under softmax; MoCo-v3's final-norm bias, which BatchNorm cancels) and float noise there,
    which differs with the summation order, would otherwise be normalised into full-size steps. 1e-6 was enough on an
    avx512 Xeon, not on an AVX2-only EPYC, whose noise there is larger (2026-12-07, fp32: MoCo-v3's losses 8.6e-4
    apart by the third step at 1e-6, 2.3e-7 at 1e-4; SimMIM's 1.1e-5 and 9.4e-7)."""
    data = fmnist_small / "train"
    one, two = tmp_path / "one", tmp_path / "two"
    common = {"train.epochs": 1, "optim.eps": 1e-4}
    run(single_cmd(*overrides(name, data, one, **common, **{"train.micro_batch": 100})))
    port = 29700 + METHODS.index(name)
    run(torchrun_cmd(2, port, *overrides(name, data, two, **common, **{"train.micro_batch": 50})))
    assert_same_run(two, one)
