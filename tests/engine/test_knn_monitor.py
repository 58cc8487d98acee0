"""The k-NN monitor during pre-training: logged when asked, invisible to training (same losses, exact resume),
the same number as the offline k-NN on the exported backbone, and the same on 2 ranks as on 1."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from launchers import REPO, RECIPE, losses, run, torchrun_cmd

from conftest import tiny_mae_overrides
from fastvit_pt.config import ConfigError, config_from_dict, load_config
from fastvit_pt.distributed.env import DistEnv
from fastvit_pt.engine.checkpoint import latest_checkpoint, load_checkpoint, model_path, rng_state
from fastvit_pt.engine.knn_monitor import KnnMonitor
from fastvit_pt.engine.loop import build_training, seed_everything, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test-size model on one intra-op thread (as launchers' ranks run): on cores shared with other jobs, two
    spinning threads ran these seconds-long runs ten times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sets(fmnist_small, tmp_path_factory):
    """(bank, queries): 40 training and 20 test images of each class, so a score takes a fraction of a second."""
    root = tmp_path_factory.mktemp("knn_sets")
    for split, per_class in (("train", 40), ("test", 20)):
        for cls in sorted((fmnist_small / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copy(f, root / split / cls.name / f.name)
    return root / "train", root / "test"


def _overrides(sets, out, **extra):
    """Training on the 400 bank images (4 steps an epoch); drop_path draws from the global torch RNG at every step,
    so a monitor that moved it would change the losses."""
    knn = {"eval.path": sets[1], "eval.knn_every_epochs": 2, "eval.knn_train_samples": 0, "model.drop_path": 0.1}
    return tiny_mae_overrides(sets[0], out, **{**knn, **extra})


def _knn_rows(run_dir: Path) -> list:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["epoch"], r["knn_top1"], r["knn_top5"]) for r in rows if "knn_top1" in r]


@pytest.fixture(scope="module")
def run_on(sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("knn_on") / "run"
    return train(load_config(None, _overrides(sets, out)))


def test_knn_is_logged_every_n_epochs_and_at_the_last(run_on):
    # 3 epochs of 4 steps, knn every 2 epochs: after epoch 2 and after the last
    rows = _knn_rows(run_on.run_dir)
    assert [(step, epoch) for step, epoch, _, _ in rows] == [(8, 2), (12, 3)]
    assert [(k["epoch"], k["bank"], k["queries"]) for k in run_on.knn] == [(2, 400, 200), (3, 400, 200)]
    assert [(top1, top5) for _, _, top1, top5 in rows] == [(k["knn_top1"], k["knn_top5"]) for k in run_on.knn]
    assert all(10 < k["knn_top1"] <= k["knn_top5"] <= 100 for k in run_on.knn)  # 10 classes: better than chance


def test_monitor_leaves_training_unchanged(sets, run_on, tmp_path):
    off = train(load_config(None, _overrides(sets, tmp_path / "off", **{"eval.knn_every_epochs": 0, "eval.path": ""})))
    assert off.knn == [] and _knn_rows(off.run_dir) == []
    assert losses(run_on.run_dir) == losses(off.run_dir)  # bit for bit
    a = load_checkpoint(latest_checkpoint(run_on.run_dir))
    b = load_checkpoint(latest_checkpoint(off.run_dir))
    assert a["rng"] == b["rng"]
    for k in a["engine"]["model"]:
        assert torch.equal(a["engine"]["model"][k], b["engine"]["model"][k]), k


def test_resume_with_monitor_is_exact(sets, run_on, tmp_path):
    part = tmp_path / "part"
    first = train(load_config(None, _overrides(sets, part, **{"train.stop_after_epochs": 1})))
    assert first.knn == []  # epoch 1 is not a multiple of 2, nor the last
    second = train(load_config(None, _overrides(sets, part)), resume="latest")
    assert losses(part) == losses(run_on.run_dir)
    assert _knn_rows(part) == _knn_rows(run_on.run_dir)
    drop = lambda ks: [{k: v for k, v in d.items() if k != "seconds"} for d in ks]  # noqa: E731
    assert drop(second.knn) == drop(run_on.knn)


def test_score_equals_offline_knn_of_the_exported_backbone(sets, run_on):
    from fastvit_pt.eval.knn import evaluate_knn

    cfg = config_from_dict(yaml.safe_load((run_on.run_dir / "config.yaml").read_text()))
    cfg.knn.batch = cfg.eval.micro_batch
    offline = evaluate_knn(str(model_path(run_on.run_dir, 3)), str(sets[0]), str(sets[1]), cfg)
    assert (offline["train_images"], offline["test_images"]) == (400, 200)
    assert (offline["top1"], offline["top5"]) == (run_on.knn[-1]["knn_top1"], run_on.knn[-1]["knn_top5"])


def test_bank_is_a_fixed_subset_of_the_asked_size(fmnist_small, sets, tmp_path):
    import pipelines.base
    from pipelines.folder import scan_folder

    # the bank: 300 of the 1000 images of eval.knn_train (not data.path, the 400 images training reads)
    cfg = load_config(None, _overrides(sets, tmp_path, **{"eval.knn_train": fmnist_small / "train",
                                                          "eval.knn_train_samples": 300}))
    seed_everything(0)
    _, _, engine, plan = build_training(cfg, DistEnv())
    before = rng_state()
    monitor = KnnMonitor(cfg, DistEnv(), plan.dtype)
    xb, yb, xq, yq = monitor.features(engine)
    xb2, yb2, _, _ = monitor.features(engine)
    assert rng_state() == before  # building and scoring leave every global RNG where it was
    assert xb.shape == (300, 32) and xq.shape == (200, 32) and xb.dtype == torch.float32
    assert torch.equal(xb, xb2) and torch.equal(yb, yb2)  # the same images at every score
    samples, _ = scan_folder(fmnist_small / "train")
    order = pipelines.base.shard_indices(len(samples), 0, 1, cfg.train.seed, 0, shuffle=True)
    assert yb.tolist() == [samples[i][1] for i in order[:300]]  # train.seed's permutation, not the file order
    assert yb.tolist() != [label for _, label in samples[:300]]
    assert engine.method.encoder().training  # its mode is put back
    for n, want in ((0, 1000), (5000, 1000), (301, 301)):
        cfg.eval.knn_train_samples = n
        assert KnnMonitor(cfg, DistEnv(), plan.dtype).bank_per_rank == want


def test_bad_settings_name_the_key(sets, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.knn_every_epochs=1 needs eval.path"):
        load_config(None, tiny_mae_overrides(sets[0], tmp_path, **{"eval.knn_every_epochs": 1}))
    with pytest.raises(ConfigError, match=r"eval.knn_every_epochs and eval.knn_train_samples must be >= 0"):
        load_config(None, _overrides(sets, tmp_path, **{"eval.knn_train_samples": -1}))
    with pytest.raises(FileNotFoundError, match=r"eval.knn_train: not found: .*nothing"):
        load_config(None, _overrides(sets, tmp_path, **{"eval.knn_train": tmp_path / "nothing"})).check_paths()
    # a method that does not classify takes eval.path only as the k-NN queries
    cfg = load_config(None, _overrides(sets, tmp_path, **{"eval.knn_every_epochs": 0}))
    with pytest.raises(ValueError, match=r"does not classify.*set eval.knn_every_epochs"):
        build_training(cfg, DistEnv())
    # bank and queries with different class folders would compare unrelated labels
    few = tmp_path / "few"
    shutil.copytree(sets[1] / sorted(p.name for p in sets[1].iterdir())[0], few / "only")
    cfg = load_config(None, _overrides(sets, tmp_path, **{"eval.path": few}))
    with pytest.raises(ValueError, match=r"eval.path: 1 classes\) name different classes"):
        KnnMonitor(cfg, DistEnv(), torch.float32)


def test_two_ranks_score_as_one_rank(sets, tmp_path):
    """Bank: the first 200 of train.seed's permutation of the 400 training images (100 per rank), queries 200
    (100 per rank). Both ranks' shards are interleaved back into the one-rank order before scoring."""
    common = {"train.epochs": 1, "optim.eps": 1e-4, "eval.knn_every_epochs": 1, "eval.knn_train_samples": 200,
              "model.drop_path": 0.0}  # each rank draws its own drop-path masks
    two = tmp_path / "two"
    r = run(torchrun_cmd(2, 29790, *_overrides(sets, two, **common, **{"train.micro_batch": 50})))
    assert r.stderr.count("knn epoch 1: top-1 ") == 1  # rank 0 reports
    one = train(load_config(REPO / RECIPE, _overrides(sets, tmp_path / "one", **common, **{"train.micro_batch": 100})))
    assert losses(two) == pytest.approx(losses(one.run_dir), rel=1e-5)
    [(step2, _, top1_2, top5_2)] = _knn_rows(two)
    [(step1, _, top1_1, top5_1)] = _knn_rows(one.run_dir)
    assert one.knn[0]["bank"] == 200 and one.knn[0]["queries"] == 200
    # the two runs' weights agree to float summation order, so the scores agree (a shard scored alone, or the
    # labels of one rank paired with the features of another, moves them by whole percents)
    assert (step2, top1_2, top5_2) == (step1, top1_1, top5_1)
