"""Shared fixtures: real data only (Fashion-MNIST from its Debian package; photographs that installed packages
ship, gathered by `fastvit data photos`, plus FASTVIT_PHOTOS=DIR[:DIR] folders where someone has them)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# a run is a function of its config in the tests: `auto` switches take the fallback, never a measurement or a
# cache a developer's runs left behind (tests/engine/test_policy.py measures, in its own cache)
os.environ["FASTVIT_PROBE"] = "0"
os.environ["FASTVIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastvit-test-cache-")


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """Real Fashion-MNIST, the first 100 train and 100 test images of each class, as an ImageFolder tree."""
    from pipelines.fashion_mnist import write_fashion_mnist

    root = tmp_path_factory.mktemp("fmnist")
    write_fashion_mnist(root, per_class=100)
    return root


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    """48 real photographs in 3 class folders, long side <= 400 px: the packages' sample photographs, then
    random crops of them (`fastvit data photos`); FASTVIT_PHOTOS folders join the sources when set."""
    from pipelines.photos import PhotoSettings, find_sources, write_photos

    extra = [d for d in os.environ.get("FASTVIT_PHOTOS", "").split(os.pathsep) if d]
    root = tmp_path_factory.mktemp("photos") / "tree"
    write_photos(root, PhotoSettings(n=48, max_side=400, classes=3), find_sources(extra), workers=2)
    return root


@pytest.fixture(scope="session")
def photo_files(photo_tree) -> list:
    """The photo tree's JPEG files, sorted: the packages' own photographs first."""
    return sorted(photo_tree.rglob("*.JPEG"), key=lambda p: p.name)


def tiny_mae_overrides(data_path: Path, out_dir: Path, **extra) -> list:
    """A seconds-long MAE run on 28-px images with the test-size model."""
    base = {
        "model.name": "mae_vit_test",
        "model.img_size": 28,
        "model.patch_size": 4,
        "data.path": str(data_path),
        "data.workers": 0,
        "data.crop_scale": "[0.4,1.0]",
        "optim.blr": 1.0e-2,
        "optim.warmup_epochs": 0,
        "train.epochs": 3,
        "train.global_batch": 100,
        "train.micro_batch": 50,
        "train.log_every": 2,
        "train.tensorboard": False,
        "train.out_dir": str(out_dir),
        "engine.device": "cpu",
        "engine.precision": "fp32",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def one_rank_reference(fmnist_small, tmp_path_factory) -> Path:
    """The 1-rank run every multi-rank run must reproduce: torch engine, global batch 100 in one micro-batch."""
    from launchers import run, single_cmd

    out = tmp_path_factory.mktemp("ref") / "run"
    run(single_cmd(*tiny_mae_overrides(fmnist_small / "train", out)))
    return out


@pytest.fixture(scope="session")
def fmnist_untrained_features(fmnist_small):
    """Pooled features of an untrained (seed 0) test-size ViT on the real Fashion-MNIST subset:
    ((train [1000, 32], labels), (test [1000, 32], labels))."""
    import torch

    import pipelines
    from fastvit_pt.eval.knn import extract_features
    from fastvit_pt.models import create_model

    torch.manual_seed(0)
    enc = create_model("vit_test", img_size=28, patch_size=4, num_classes=0)

    def feats(split):
        cfg = pipelines.PipelineConfig(backend="torchvision", path=str(fmnist_small / split), workers=0)
        return extract_features(enc, pipelines.build_loader(cfg, img_size=28, batch_size=100, train=False,
                                                            drop_last=False))

    return feats("train"), feats("test")
