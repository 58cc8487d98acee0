"""Fine-tuning: mixup / erasing on the device, evaluation arithmetic, the best checkpoint, init from a
pre-training checkpoint, and the user-facing errors."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import REPO, tiny_mae_overrides
from fastvit_pt.config import load_config
from fastvit_pt.distributed.env import DistEnv
from fastvit_pt.engine.evaluate import evaluate
from fastvit_pt.methods.finetune import Finetune
from fastvit_pt.models import create_model
from pipelines.base import Batch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _finetune(**kw) -> Finetune:
    torch.manual_seed(0)
    return Finetune(create_model("vit_test", img_size=28, patch_size=4, num_classes=10), 10, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_mixup_mixes_images_and_targets_on_the_device(device):
    method = _finetune(mixup=0.2).to(device)
    x = torch.randn(8, 3, 28, 28, device=device)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], device=device)
    torch.manual_seed(1)
    import numpy as np

    np.random.seed(3)  # timm draws lam from numpy
    mixed, target = method.augment(x.clone(), y)
    assert mixed.device == x.device and target.device == x.device and target.shape == (8, 10)
    torch.testing.assert_close(target.sum(1), torch.ones(8, device=device))
    lam = target[0, 0].item()  # sample 0 (class 0) is paired with sample 7 (class 7): lam x0 + (1 - lam) x7
    assert 0.0 < lam < 1.0 and target[0, 7].item() == pytest.approx(1 - lam, abs=1e-6)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    with pytest.raises(ValueError, match="micro_batch must be even"):
        method.augment(x[:7].clone(), y[:7])


def test_soft_target_loss_and_eval_mode_uses_hard_labels():
    method = _finetune(mixup=0.8, cutmix=1.0, smoothing=0.1)
    batch = Batch(torch.randn(4, 3, 28, 28), torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(method(batch)["loss"])
    method.eval()  # no mixing outside training: plain cross-entropy with smoothing
    logits = method.model(batch.images).float()
    expect = nn.functional.cross_entropy(logits, batch.labels, label_smoothing=0.1)
    torch.testing.assert_close(method(batch)["loss"], expect)


def test_random_erasing_replaces_a_region_with_noise():
    method = _finetune(reprob=1.0)
    x = torch.zeros(4, 3, 28, 28)
    erased, _ = method.augment(x.clone(), torch.zeros(4, dtype=torch.long))
    changed = (erased != 0).flatten(1).float().mean(1)
    assert (changed > 0).all() and (changed < 1).all()  # every sample has one noise patch, not the whole image


class _Scores(nn.Module):
    """A 'classifier' whose logits are its input, flattened: the known case."""

    def forward(self, x):
        return x.flatten(1)


class _Method(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _Scores()

    def encoder(self):
        return self.net


def test_eval_top1_top5_and_loss_on_a_known_case():
    # 8 samples, 6 classes: top-1 right for samples 0-4 (5/8), true class 2nd..5th for 5-6, last for 7 (7/8 top-5)
    scores = torch.tensor([[6., 5, 4, 3, 2, 1]]).repeat(8, 1)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 4, 5])
    images = scores.view(8, 1, 1, 6)
    loader = [Batch(images[:5], labels[:5]), Batch(images[5:], labels[5:])]
    engine = SimpleNamespace(method=_Method(), autocast=contextlib.nullcontext(), kernels=contextlib.nullcontext)
    res = evaluate(engine, loader, DistEnv())
    logp = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    hand_loss = -logp[torch.arange(8), labels].mean().item()
    assert res["top1"] == 62.5 and res["top5"] == 87.5 and res["images"] == 8
    assert res["loss"] == pytest.approx(hand_loss, abs=1e-4)


@pytest.fixture(scope="module")
def mae_run(fmnist_small, tmp_path_factory) -> Path:
    """A one-epoch MAE pre-training (fp32, pinned by tiny_mae_overrides) to fine-tune from."""
    from fastvit_pt.engine.loop import train

    out = tmp_path_factory.mktemp("pre") / "run"
    train(load_config(None, tiny_mae_overrides(fmnist_small / "train", out, **{"train.epochs": 1})))
    return out


def _finetune_overrides(fmnist_small: Path, out: Path, init: str, **extra):
    base = {
        "model.name": "vit_test", "init": init, "data.path": str(fmnist_small / "train"), "data.workers": 0,
        "eval.path": str(fmnist_small / "test"), "eval.every_epochs": 1, "eval.micro_batch": 200,
        "optim.blr": 5e-3, "optim.warmup_epochs": 0, "train.epochs": 2, "train.global_batch": 100,
        "train.micro_batch": 50, "train.log_every": 5, "train.tensorboard": False, "train.out_dir": str(out),
    }
    base.update(extra)
    return [f"method.{k}={v}" if k == "init" else f"{k}={v}" for k, v in base.items()]


# both on every machine: bf16 is native on some CPUs and emulated (slow, so the run is tiny) on others
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_from_mae_keeps_the_best_and_its_weights_score_it(fmnist_small, mae_run, tmp_path, precision):
    import pipelines
    from fastvit_pt.engine.plan import DTYPES
    from fastvit_pt.engine.evaluate import BEST_MODEL, read_best
    from fastvit_pt.engine.loop import build_training, train
    from fastvit_pt.engine.backbone import read_backbone

    cfg = load_config(REPO / "recipes/demo/finetune_fmnist.yaml",
                      _finetune_overrides(fmnist_small, tmp_path / "ft", str(mae_run), **{"engine.precision": precision}))

    # the encoder starts from the pre-trained blocks; the head is fresh and tiny; groups carry layer decay
    _, method, engine, plan = build_training(cfg, DistEnv())
    enc, _, _ = read_backbone(mae_run)
    torch.testing.assert_close(method.model.blocks[1].attn.qkv.weight, enc["blocks.1.attn.qkv.weight"])
    assert method.model.head.weight.abs().max() < 1e-3
    scales = sorted({g["lr_scale"] for g in engine.optimizer.param_groups})
    assert scales == pytest.approx([0.85 ** k for k in range(3, -1, -1)])  # depth 2: embeddings 0.85^3 .. head 1

    res = train(cfg)
    assert [e["epoch"] for e in res.evals] == [1, 2]
    best = read_best(tmp_path / "ft")
    assert best == res.best and best["top1"] == max(e["top1"] for e in res.evals)
    assert best["precision"] == precision  # what "scored" means: evaluated in the run's precision
    assert best["top1"] > 15.0  # 10 balanced classes: chance is 10% (+-1% over 1,000 test images)

    # model-best.pt holds the weights that scored best: loaded into a fresh classifier and evaluated as the run
    # evaluated (its attention, images in its compute dtype, its autocast) they score it again, exactly
    cpu = torch.device("cpu")
    model = create_model("vit_test", img_size=28, patch_size=4, num_classes=10, global_pool="avg",
                         attn_impl=plan.attn_impl)
    model.load_state_dict(torch.load(tmp_path / "ft" / BEST_MODEL, weights_only=True))
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())  # exported fp32, whatever the run
    loader = pipelines.build_loader(cfg.data.__class__(path=str(fmnist_small / "test"), workers=0, mean=cfg.data.mean,
                                                       std=cfg.data.std), img_size=28, batch_size=200, train=False,
                                    drop_last=False, dtype=DTYPES[precision])
    autocast = contextlib.nullcontext() if precision == "fp32" else torch.autocast("cpu", dtype=torch.bfloat16)
    engine = SimpleNamespace(method=SimpleNamespace(encoder=lambda: model), autocast=autocast,
                             kernels=contextlib.nullcontext)
    assert evaluate(engine, loader, DistEnv())["top1"] == best["top1"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastvit_pt.cli", *args], cwd=REPO, capture_output=True, text=True)


def test_finetune_errors_name_the_problem(fmnist_small, tmp_path):
    r = _cli("finetune", "recipes/demo/finetune_fmnist.yaml", f"data.path={fmnist_small / 'train'}",
             f"eval.path={fmnist_small / 'test'}", "--out", str(tmp_path / "a"))
    assert r.returncode != 0 and "method.init is required" in r.stderr and "Traceback" not in r.stderr
    r = _cli("finetune", "recipes/demo/mae_fmnist.yaml", "init=scratch", "--out", str(tmp_path / "b"))
    assert r.returncode != 0 and "needs a fine-tuning recipe" in r.stderr
    r = _cli("finetune", "recipes/demo/finetune_fmnist.yaml", f"init={tmp_path / 'nothing.pt'}",
             f"data.path={fmnist_small / 'train'}", f"eval.path={fmnist_small / 'test'}", "--out", str(tmp_path / "c"))
    assert r.returncode != 0 and "nothing.pt" in r.stderr and "Traceback" not in r.stderr
    # evaluation during training is for classifiers
    r = _cli("train", "recipes/demo/mae_fmnist.yaml", f"data.path={fmnist_small / 'train'}",
             f"eval.path={fmnist_small / 'test'}", "model.name=mae_vit_test", "--out", str(tmp_path / "d"))
    assert r.returncode != 0 and "does not classify" in r.stderr
