"""Real MAE training on real Fashion-MNIST, at test size: the loss falls, resume is exact, failures are clear."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_mae_overrides
from fastvit_pt.config import load_config
from fastvit_pt.engine.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from fastvit_pt.distributed.env import DistEnv
from fastvit_pt.engine.loop import NonFiniteLossError, build_training, seed_everything, train


def _losses(run_dir: Path):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_the_loss(fmnist_small, tmp_path):
    cfg = load_config(None, tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"train.epochs": 4}))
    res = train(cfg)
    assert res.epochs_run == 4 and res.steps == 40
    losses = _losses(tmp_path / "run")
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, f"loss did not fall: {losses}"
    assert (tmp_path / "run" / "config.yaml").is_file()
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt["epoch"] == 3 and ckpt["engine"]["global_step"] == 40
    assert set(ckpt) >= {"engine", "epoch", "rng", "config"}
    assert set(ckpt["engine"]) >= {"model", "optimizer", "scaler", "global_step"}


@pytest.mark.parametrize("backend", ["torchvision", "dali", "turbo", "ffcv"])
def test_resume_is_exact(fmnist_small, tmp_path, backend, capsys):
    data = fmnist_small / "train"
    if backend == "ffcv":  # through FFCV with the crop decoder: every augmentation is a function of the sample key
        from pipelines.beton import ConvertSettings, convert

        data = tmp_path / "train.beton"
        convert(fmnist_small / "train", data, ConvertSettings(mode="raw", workers=2, strict=True))
    full = tmp_path / "full"
    be = {"data.backend": backend, "data.workers": 0 if backend == "torchvision" else 2}
    train(load_config(None, tiny_mae_overrides(data, full, **be)))
    part = tmp_path / "part"
    first = train(load_config(None, tiny_mae_overrides(data, part, **be, **{"train.stop_after_epochs": 1})))
    assert first.epochs_run == 1
    capsys.readouterr()
    second = train(load_config(None, tiny_mae_overrides(data, part, **be)), resume="latest")
    assert second.epochs_run == 2
    assert f"resuming from {part / 'checkpoint-0001.pt'} (epoch 1, step 10): 2 of 3 epochs to go" in capsys.readouterr().err
    assert _losses(part) == _losses(full)  # bit-identical, not merely close
    a = load_checkpoint(latest_checkpoint(full))["engine"]["model"]
    b = load_checkpoint(latest_checkpoint(part))["engine"]["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fresh_run_refuses_a_used_directory(fmnist_small, tmp_path):
    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"train.epochs": 1})
    train(load_config(None, over))
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume"):
        train(load_config(None, over))
    nothing = train(load_config(None, over), resume="latest")
    assert nothing.epochs_run == 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(fmnist_small, tmp_path):
    run = tmp_path / "run"
    over = tiny_mae_overrides(fmnist_small / "train", run, **{"train.epochs": 3, "train.stop_after_epochs": 1})
    train(load_config(None, over))
    good = latest_checkpoint(run)
    before = good.read_bytes()
    # an absurd learning rate makes the next epoch diverge
    hot = tiny_mae_overrides(fmnist_small / "train", run, **{"train.epochs": 3, "optim.lr": 1.0e12})
    with pytest.raises(NonFiniteLossError, match=r"non-finite.*last good checkpoint is .*checkpoint-0001\.pt"):
        train(load_config(None, hot), resume="latest")
    assert latest_checkpoint(run) == good and good.read_bytes() == before
    assert all(math.isfinite(v) for v in load_checkpoint(good)["engine"]["model"]["model.mask_token"].flatten().tolist())


def test_truncated_checkpoint_is_a_clear_error(fmnist_small, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_mae_overrides(fmnist_small / "train", run, **{"train.epochs": 1})))
    ckpt = latest_checkpoint(run)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*checkpoint-0001\.pt \(1000 bytes\): it is truncated"):
        train(load_config(None, tiny_mae_overrides(fmnist_small / "train", run)), resume="latest")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(run / "nope.pt")


def test_missing_data_path_is_a_clear_error(tmp_path):
    cfg = load_config(None, tiny_mae_overrides(tmp_path / "no_such_dir", tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match=r"data folder not found: .*no_such_dir"):
        train(cfg)


def test_accumulation_matches_one_big_batch(fmnist_small, tmp_path):
    """2 micro-batches of 50 accumulate to the gradient of one batch of 100 (same images, same masks).

    Compared on gradients, not on weights after training: Adam turns float noise in a zero-in-theory
    gradient (the attention key bias) into lr-sized steps."""
    grads, losses = {}, {}
    for micro in (50, 100):
        cfg = load_config(None, tiny_mae_overrides(fmnist_small / "train", tmp_path / str(micro),
                                                   **{"train.micro_batch": micro}))
        seed_everything(0)
        loader, method, engine, _ = build_training(cfg, DistEnv())
        assert engine.accum == 100 // micro
        torch.manual_seed(1)
        stepped = []
        it = iter(loader)
        total = 0.0
        for _ in range(engine.accum):
            out = engine(next(it))
            engine.backward(out["loss"])
            total += out["loss"].item() / engine.accum
            if len(stepped) < engine.accum - 1:
                stepped.append(engine.step())
        assert stepped == [False] * (engine.accum - 1)  # no optimizer step before the boundary
        grads[micro] = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}
        losses[micro] = total
    assert losses[50] == pytest.approx(losses[100], rel=1e-6)
    for name, g in grads[100].items():
        torch.testing.assert_close(grads[50][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_clipping_and_tensorboard_are_logged(fmnist_small, tmp_path):
    run = tmp_path / "run"
    over = tiny_mae_overrides(fmnist_small / "train", run, **{"train.epochs": 1, "optim.clip_grad": 0.5,
                                                              "train.tensorboard": True})
    train(load_config(None, over))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in rows)
    assert {"step", "epoch", "lr", "img_per_s", "loss"} <= set(rows[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"loss", "lr", "img_per_s", "grad_norm"} <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows])


def test_ffcv_backend_trains(fmnist_small, tmp_path):
    """The whole path through FFCV: convert real Fashion-MNIST to a .beton, pre-train from it."""
    from pipelines.beton import ConvertSettings, convert

    beton = tmp_path / "train.beton"
    convert(fmnist_small / "train", beton, ConvertSettings(mode="raw", workers=2, strict=True))
    over = tiny_mae_overrides(beton, tmp_path / "run", **{"data.backend": "ffcv", "data.workers": 1,
                                                          "data.interpolation": "bilinear", "train.epochs": 4})
    res = train(load_config(None, over))
    assert res.steps == 40
    losses = _losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses


def test_compiled_run_resumes_bit_exactly_and_matches_the_eager_run(fmnist_small, tmp_path):
    """engine.compile=true (what `auto` turns on for a long run): stopping and resuming gives the uninterrupted
    compiled run's losses bit for bit, and the compiled losses match eager ones within 1e-3 (relative; inductor
    fuses and reorders fp32 arithmetic, so bitwise equality with eager is not expected)."""
    data = fmnist_small / "train"
    run = lambda out, **kw: load_config(None, tiny_mae_overrides(data, tmp_path / out, **{  # noqa: E731
        "train.epochs": 2, "engine.compile": True, **kw}))
    train(run("full"))
    train(run("part", **{"train.stop_after_epochs": 1}))
    train(run("part"), resume="latest")
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    train(run("eager", **{"engine.compile": False}))
    compiled, eager = _losses(tmp_path / "full"), _losses(tmp_path / "eager")
    assert len(compiled) == len(eager) == 10
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=0)
