"""The DeepSpeed engine for real, on CPU (gloo, DeepSpeed's CPU accelerator): generated config, 2-rank ZeRO-1
== 1-rank, accumulation, exact resume, world-size changes, the deepspeed launcher, the exported backbone."""
import json
import shutil

import pytest
import torch
from launchers import assert_same_run, deepspeed_cmd, final_params, losses, run, single_cmd, torchrun_cmd

from conftest import tiny_mae_overrides
from fastvit_pt.config import ConfigError, load_config
from fastvit_pt.engines import deepspeed_engine
from fastvit_pt.engine.checkpoint import latest_checkpoint

DS = {"engine.kind": "deepspeed"}


def deepspeed_config(cfg, world_size: int, precision: str = "fp32"):
    """The engine's generated config for `cfg` on `world_size` ranks, through the run plan, as a run builds it."""
    from fastvit_pt.distributed.env import DistEnv
    from fastvit_pt.engine.plan import make_plan

    cfg.engine.precision = precision
    device = torch.device("cuda" if precision == "fp16" else "cpu")  # only a plan: nothing runs there
    return deepspeed_engine.deepspeed_config(make_plan(cfg, DistEnv(0, world_size, 0, device)), cfg.engine, cfg.optim)


def cfg_with(**over):
    return load_config(None, [f"{k}={v}" for k, v in {"train.global_batch": 256, "train.micro_batch": 32, **over}.items()])


def test_generated_config_follows_the_recipe():
    c = deepspeed_config(cfg_with(**{"optim.clip_grad": 1.0, "engine.zero_stage": 2}), world_size=4, precision="bf16")
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (256, 32, 2)
    assert c["zero_optimization"] == {"stage": 2} and c["gradient_clipping"] == 1.0
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    fp16 = deepspeed_config(cfg_with(), world_size=1, precision="fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert "optimizer" not in c and "scheduler" not in c  # ours: torch AdamW, our per-iteration schedule


def test_inconsistent_batch_and_world_size_is_refused():
    with pytest.raises(ValueError, match=r"train.global_batch \(256\) is not a multiple of train.micro_batch \(32\) "
                                         r"x world size \(3\)"):
        deepspeed_config(cfg_with(), world_size=3, precision="fp32")


def test_overlay_adds_keys_and_refuses_contradictions(tmp_path):
    overlay = tmp_path / "ds.json"
    overlay.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7},
                                   "communication_data_type": "fp32"}))
    c = deepspeed_config(cfg_with(**DS, **{"engine.deepspeed_config": overlay}), world_size=2, precision="fp32")
    assert c["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 5e7} and c["communication_data_type"] == "fp32"
    overlay.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="sets 'train_micro_batch_size_per_gpu' to 16, but the recipe gives 32"):
        deepspeed_config(cfg_with(**DS, **{"engine.deepspeed_config": overlay}), world_size=2, precision="fp32")
    overlay.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer'.*recipe's optim section"):
        deepspeed_config(cfg_with(**DS, **{"engine.deepspeed_config": overlay}), world_size=2, precision="fp32")
    with pytest.raises(ConfigError, match="file not found"):
        deepspeed_config(cfg_with(**DS, **{"engine.deepspeed_config": tmp_path / "nope.json"}), world_size=2)


@pytest.fixture(scope="module")
def zero1_two_ranks(fmnist_small, tmp_path_factory):
    """2 ranks under torchrun, ZeRO-1, fp32, 25 images per rank per micro-step (global batch 100)."""
    out = tmp_path_factory.mktemp("zero1") / "run"
    run(torchrun_cmd(2, 29621, *tiny_mae_overrides(fmnist_small / "train", out, **{"train.micro_batch": 25}, **DS)))
    return out


def test_two_rank_zero1_equals_one_rank(zero1_two_ranks, one_rank_reference):
    ckpt = latest_checkpoint(zero1_two_ranks)
    assert ckpt.is_dir() and {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} \
        <= {p.name for p in ckpt.iterdir()}  # the optimizer state really is partitioned
    assert_same_run(zero1_two_ranks, one_rank_reference)


def test_two_rank_zero1_resume_is_exact(zero1_two_ranks, fmnist_small, tmp_path):
    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "part", **{"train.micro_batch": 25}, **DS)
    run(torchrun_cmd(2, 29622, *over, "train.stop_after_epochs=1"))
    run(torchrun_cmd(2, 29623, *over, "--resume"))
    assert losses(tmp_path / "part") == losses(zero1_two_ranks)  # bit for bit
    a, b = final_params(tmp_path / "part"), final_params(zero1_two_ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero1_checkpoint_on_another_world_size_is_a_clear_error(zero1_two_ranks, fmnist_small, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero1_two_ranks, run_dir)
    r = run(single_cmd(*tiny_mae_overrides(fmnist_small / "train", run_dir, **{"train.epochs": 4}, **DS), "--resume"),
            ok=False)
    assert r.returncode == 1
    assert "partitioned over 2 ranks and this run has 1" in r.stderr and "Resume on 2 ranks" in r.stderr


def test_zero0_resumes_on_another_world_size_via_the_deepspeed_launcher(fmnist_small, tmp_path):
    """2 ranks started by the deepspeed launcher write a ZeRO-0 checkpoint; 1 rank finishes the run."""
    out = tmp_path / "run"
    over = tiny_mae_overrides(fmnist_small / "train", out, **{"engine.zero_stage": 0}, **DS)
    r = run(deepspeed_cmd(2, 29624, *over, "train.micro_batch=25", "train.stop_after_epochs=1"))
    assert "Process" in r.stderr + r.stdout and "exits successfully" in r.stderr + r.stdout
    r = run(single_cmd(*over, "--resume"))
    assert "resuming 2-rank RNG states on 1 ranks" in r.stderr
    assert len(losses(out)) == 15 and latest_checkpoint(out).name == "checkpoint-0003"


def test_accumulation_8x4_equals_32(fmnist_small, tmp_path):
    over = lambda out, micro: tiny_mae_overrides(fmnist_small / "train", tmp_path / out, **{  # noqa: E731
        "train.global_batch": 32, "train.micro_batch": micro, "train.epochs": 1, "train.log_every": 5}, **DS)
    run(single_cmd(*over("acc", 8)))
    run(single_cmd(*over("one", 32)))
    assert_same_run(tmp_path / "acc", tmp_path / "one")
    assert len(losses(tmp_path / "one")) == 7  # 31 steps, a log every 5 and at the end


def test_exported_backbone_loads_into_timm(zero1_two_ranks):
    import timm

    from fastvit_pt.models import create_model

    sd = torch.load(zero1_two_ranks / "model-0003.pt", weights_only=True)
    enc = create_model("mae_vit_test", img_size=28, patch_size=4).encoder
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, embed_dim=enc.embed_dim, depth=len(enc.blocks), num_heads=enc.blocks[0].attn.num_heads,
        num_classes=0)
    ref.load_state_dict(sd, strict=True)
    module = final_params(zero1_two_ranks)
    for k, v in sd.items():
        assert torch.equal(v, module["model.encoder." + k].float()), k


def test_a100x32_recipe_is_consistent_on_32_ranks():
    from conftest import REPO

    cfg = load_config(REPO / "recipes/mae_tiny_1600ep_a100x32.yaml")
    c = deepspeed_config(cfg, world_size=32, precision=cfg.engine.precision)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (4096, 128, 1)
    assert c["zero_optimization"]["stage"] == 1 and c["bf16"]["enabled"] and cfg.data.backend in ("dali", "ffcv")
    assert cfg.train.epochs == 1600 and cfg.peak_lr == pytest.approx(2.4e-3)
    with pytest.raises(ValueError, match="world size \\(24\\)"):  # 3 nodes would not divide the batch
        deepspeed_config(cfg, world_size=24, precision="bf16")


def test_bf16_zero1_exports_the_fp32_master_weights(fmnist_small, tmp_path):
    """Under bf16 the module holds 16-bit weights; the export is the optimizer's fp32 master copy, which
    rounds to exactly the module's weights but is not merely their up-cast."""
    out = tmp_path / "run"
    run(single_cmd(*tiny_mae_overrides(fmnist_small / "train", out, **{
        "engine.precision": "bf16", "train.epochs": 1, "train.global_batch": 50, "train.micro_batch": 50}, **DS)))
    exported = torch.load(out / "model-0001.pt", weights_only=True)
    module = final_params(out)
    for k, v in exported.items():
        assert v.dtype == torch.float32
        assert torch.equal(v.bfloat16(), module["model.encoder." + k]), k
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(exported[w], module["model.encoder." + w].float())


def test_bf16_keeps_fp32_master_weights_and_gradient_accumulation():
    """As the torch engine (fp32 weights and gradients under autocast): ZeRO-1 accumulates and reduces in fp32
    (DeepSpeed's BF16_Optimizer), ZeRO-2 reduces in fp32, and ZeRO-0 (no fp32 master copy at all) is refused."""
    c1 = deepspeed_config(cfg_with(**{"engine.zero_stage": 1}), world_size=2, precision="bf16")
    assert c1["data_types"] == {"grad_accum_dtype": "fp32"}
    c2 = deepspeed_config(cfg_with(**{"engine.zero_stage": 2}), world_size=2, precision="bf16")
    assert c2["communication_data_type"] == "fp32"
    assert "data_types" not in deepspeed_config(cfg_with(), world_size=2, precision="fp32")
    with pytest.raises(ConfigError, match="zero_stage 1 or 2.*no fp32 master weights"):
        deepspeed_config(cfg_with(**{"engine.zero_stage": 0}), world_size=2, precision="bf16")


def test_a_gpu_recipe_fails_loudly_without_cuda():
    """The A100 recipe names engine.device: cuda; without CUDA (or with a driver too old for the build) a rank
    must stop, not train on CPU over gloo."""
    from conftest import REPO
    from fastvit_pt.distributed.env import pick_device

    cfg = load_config(REPO / "recipes/mae_tiny_1600ep_a100x32.yaml")
    assert cfg.engine.device == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pick_device(cfg.engine.device)


def test_compiled_deepspeed_matches_the_eager_torch_run(fmnist_small, one_rank_reference, tmp_path):
    """engine.compile=true under DeepSpeed (its engine.compile()): the same losses as the eager torch-engine run
    within 1e-3 relative (inductor reorders fp32 arithmetic)."""
    out = tmp_path / "ds_compiled"
    run(single_cmd(*tiny_mae_overrides(fmnist_small / "train", out, **{"engine.compile": True}, **DS)))
    a, b = losses(out), losses(one_rank_reference)
    assert len(a) == len(b) == 15 and a == pytest.approx(b, rel=1e-3)
