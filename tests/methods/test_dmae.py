"""D-MAE / D2-MAE: the frozen teacher, the head-mixing adapter, the loss, shared masks, block-8 decoding."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_mae_overrides
from fastvit_pt.config import ConfigError, load_config
from fastvit_pt.distributed.env import DistEnv
from fastvit_pt.engine.backbone import export_for_timm
from fastvit_pt.methods.d2mae import D2MAE
from fastvit_pt.methods.dmae import DMAE, head_mixing_adapter
from fastvit_pt.models import create_model
from fastvit_pt.models.mae import keyed_shuffle, num_visible
from pipelines.base import Batch


def _student(**kw):
    torch.manual_seed(0)
    return create_model("mae_vit_test", img_size=28, patch_size=4, attn_impl="math", **kw)


def _batch(n=4):
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(n, 3, 28, 28, generator=g), torch.zeros(n, dtype=torch.long), torch.arange(n) * 7919 + 3)


def test_adapter_mixes_heads_when_counts_differ():
    conv = head_mixing_adapter(2, 3)
    x = torch.randn(2, 2, 5, 5)
    expect = torch.einsum("bhnm,gh->bgnm", x, conv.weight[:, :, 0, 0])
    torch.testing.assert_close(conv(x), expect)
    assert conv(x).shape == (2, 3, 5, 5) and conv.bias is None


def test_adapter_starts_as_mae_lites_conv2d():
    """mae-lite's attn_adapter is a plain nn.Conv2d(H_s, H_t, 1, bias=False) with its default initialisation:
    drawn from the same RNG state, the same weights here (not the identity, even for equal head counts)."""
    for heads in ((3, 3), (3, 6)):
        torch.manual_seed(11)
        reference = torch.nn.Conv2d(*heads, 1, bias=False)
        torch.manual_seed(11)
        adapter = head_mixing_adapter(*heads)
        torch.testing.assert_close(adapter.weight, reference.weight)
        assert adapter.bias is None


def test_teacher_sees_the_students_visible_patches():
    """A teacher that is a copy of the student's encoder produces exactly the student's last-layer logits only
    if it sees the same patches in the same order: the distillation loss is then zero."""
    student = _student()
    teacher = create_model("vit_test", img_size=28, patch_size=4, num_classes=0, attn_impl="math")
    teacher.load_state_dict(student.encoder.state_dict())
    m = DMAE(student, teacher, 0.75)
    with torch.no_grad():  # head to head, so that equal logits give a zero loss
        h = m.adapter.weight.shape[0]
        m.adapter.weight.copy_(torch.eye(h).view(h, h, 1, 1))
    out = m(_batch())
    assert out["loss_attn"].item() < 1e-10 and out["loss"].item() == pytest.approx(out["loss_mae"].item())
    # and a different mask on the teacher's side would not be zero
    ids = keyed_shuffle(_batch().keys, 49)
    t_logits, _ = m.teacher.targets(_batch().images, ids.roll(1, dims=1), num_visible(49, 0.75))
    _, s_logits, _, _ = m.student_forward(_batch().images, ids)
    assert (t_logits - s_logits).abs().max() > 1e-3


def test_teacher_is_stored_in_the_autocast_dtype():
    """Under bf16 autocast (GPU, native-bf16 CPUs) the frozen teacher moves to bf16 once, instead of having its
    weights re-cast on every step; without autocast it keeps the batch's dtype."""
    student = _student()
    teacher = create_model("vit_test", img_size=28, patch_size=4, num_classes=0, attn_impl="math")
    m = DMAE(student, teacher, 0.75)
    m(_batch())
    assert next(teacher.parameters()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(_batch())
    assert next(teacher.parameters()).dtype == torch.bfloat16 and torch.isfinite(out["loss"])


def test_distillation_loss_equals_a_hand_computation():
    student = _student()
    torch.manual_seed(5)
    teacher = create_model("vit_test", img_size=28, patch_size=4, num_classes=0, num_heads=4, embed_dim=32,
                           attn_impl="math")
    m = DMAE(student, teacher, 0.75, attn_weight=0.5)
    batch = _batch()
    out = m(batch)
    # by hand: the student's logits through the adapter's matrix, the teacher's from its full forward on the
    # visible tokens only (its last block's pre-softmax q.k^T), MSE over every element
    ids = keyed_shuffle(batch.keys, 49)
    keep = ids[:, : num_visible(49, 0.75)]
    enc = student.forward_encoder(batch.images, 0.75, ids, attn_layers=[-1])
    s = torch.einsum("bhnm,gh->bgnm", enc.attn_logits[1], m.adapter.weight[:, :, 0, 0])
    x = teacher.embed_patches(batch.images)
    x = teacher.prepend_cls(torch.gather(x, 1, keep[..., None].expand(-1, -1, 32)))
    _, t = teacher.forward_tokens(x, attn_layers=[-1])
    hand = ((s - t[1]) ** 2).mean()
    torch.testing.assert_close(out["loss_attn"], hand)
    torch.testing.assert_close(out["loss"], out["loss_mae"] + 0.5 * hand)
    assert t[1].shape == (4, 4, 13, 13)  # [B, H_t, 1 + 12 visible, 1 + 12]


def test_hidden_state_distillation_is_optional_and_logged():
    student = _student()
    teacher = create_model("vit_test", img_size=28, patch_size=4, num_classes=0, embed_dim=48, num_heads=4)
    out = DMAE(student, teacher, 0.75, hidden_layers=[0, 1], hidden_weight=2.0)(_batch())
    assert set(out) == {"loss", "loss_mae", "loss_attn", "loss_hidden"}
    torch.testing.assert_close(out["loss"], out["loss_mae"] + out["loss_attn"] + 2.0 * out["loss_hidden"])
    with pytest.raises(ValueError, match="hidden_layers"):
        DMAE(_student(), teacher, 0.75, hidden_layers=[3])  # 0..2 for 2-block models


def _rep_by_hand(vit, tokens, i):
    """mae-lite's RepCatcher by hand: run i blocks, then block i's norm1 (or the final norm after the last)."""
    for blk in vit.blocks[:i]:
        tokens = blk(tokens)
    return vit.blocks[i].norm1(tokens) if i < vit.depth else vit.norm(tokens)


def test_hidden_distillation_reads_mae_lites_normalised_representations():
    """Index i is the representation after i blocks through a LayerNorm (block i's norm1; the final norm at the
    depth), student and teacher on the same visible tokens, the student's through a Linear without bias."""
    student = _student()
    torch.manual_seed(6)
    teacher = create_model("vit_test", img_size=28, patch_size=4, num_classes=0, embed_dim=48, num_heads=4,
                           attn_impl="math")
    m = DMAE(student, teacher, 0.75, hidden_layers=[0, 1, 2])
    assert all(a.bias is None for a in m.hidden_adapters.values())
    batch = _batch()
    out = m(batch)
    keep = keyed_shuffle(batch.keys, 49)[:, : num_visible(49, 0.75)]

    def visible(vit, dim):
        x = vit.embed_patches(batch.images)
        return vit.prepend_cls(torch.gather(x, 1, keep[..., None].expand(-1, -1, dim)))

    s0, t0 = visible(student.encoder, 32), visible(teacher, 48)
    hand = sum(((m.hidden_adapters[str(i)].weight @ _rep_by_hand(student.encoder, s0, i)[..., None]).squeeze(-1)
                - _rep_by_hand(teacher, t0, i)).square().mean() for i in (0, 1, 2)) / 3
    torch.testing.assert_close(out["loss_hidden"], hand)


def test_d2mae_decodes_from_block_8_equivalent_and_distils_on_top():
    student = _student()  # 2 blocks here: the decoder reads block 1's output, the logits block sits on block 2
    teacher = create_model("vit_test", img_size=28, patch_size=4, num_classes=0)
    m = D2MAE(student, teacher, 0.75, decoder_block=1)
    seen = {}
    student.encoder.blocks[0].register_forward_hook(lambda mod, i, o: seen.__setitem__("block", o))
    student.encoder.blocks[1].register_forward_hook(lambda mod, i, o: seen.__setitem__("last", o))
    student.decoder_embed.register_forward_hook(lambda mod, i, o: seen.__setitem__("decoder_in", i[0]))
    m.logits_block.register_forward_hook(lambda mod, i, o: seen.__setitem__("logits_in", i[0]))
    out = m(_batch())
    torch.testing.assert_close(seen["decoder_in"], m.decoder_input_norm(seen["block"]))
    assert seen["logits_in"] is seen["last"]
    out["loss"].backward()
    assert student.encoder.norm.weight.grad is None and m.logits_block.qk.weight.grad is not None
    assert student.encoder.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0  # trained by distillation alone
    assert m.encoder() is student.encoder and len(m.encoder().blocks) == 2  # export keeps the real blocks


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(3)
    return export_for_timm(create_model("vit_test", img_size=28, patch_size=4, num_classes=0), tmp_path / "teacher.pt")


def _cfg(fmnist_small, tmp_path, teacher, method="dmae"):
    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"method.name": method, "train.epochs": 1})
    extra = ["method.decoder_block=1"] if method == "d2mae" else []
    return load_config(None, over + [f"method.teacher={teacher}", "method.teacher_model=vit_test", *extra])


def test_teacher_is_frozen_unwrapped_and_outside_optimizer_and_checkpoint(fmnist_small, tmp_path, teacher_file):
    import pipelines
    from fastvit_pt.engine.loop import build_training

    _, method, engine, _ = build_training(_cfg(fmnist_small, tmp_path, teacher_file), DistEnv())
    teacher = method.teacher.encoder
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    opt_ids = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_ids for p in teacher.parameters())
    assert not any(m is teacher for m in method.modules()) and not any(k.startswith("teacher") for k in method.state_dict())
    method.train()
    batch = next(iter(pipelines.build_loader(_cfg(fmnist_small, tmp_path, teacher_file).data, img_size=28,
                                             batch_size=50)))
    out = engine(batch)
    engine.backward(out["loss"])
    engine.step()
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not engine.optimizer.state.keys() & set(teacher.parameters())


def test_checkpoint_round_trip_keeps_the_adapter(fmnist_small, tmp_path, teacher_file):
    from fastvit_pt.engine.checkpoint import load_checkpoint
    from fastvit_pt.engine.loop import build_training

    cfg = _cfg(fmnist_small, tmp_path, teacher_file, method="d2mae")
    _, method, engine, _ = build_training(cfg, DistEnv())
    with torch.no_grad():
        method.adapter.weight.normal_()
        method.logits_block.qk.weight.normal_()
    engine.save(tmp_path / "ck.pt", {"epoch": 0, "rng": [], "config": {}, "engine_kind": "torch"})
    _, again, engine2, _ = build_training(cfg, DistEnv())
    assert not torch.equal(again.adapter.weight, method.adapter.weight)
    engine2.load(tmp_path / "ck.pt", load_checkpoint(tmp_path / "ck.pt"))
    torch.testing.assert_close(again.adapter.weight, method.adapter.weight)
    torch.testing.assert_close(again.logits_block.qk.weight, method.logits_block.qk.weight)


def test_missing_teacher_is_a_clear_error(fmnist_small, tmp_path):
    from fastvit_pt.engine.loop import build_training

    cfg = load_config("recipes/dmae_tiny_400ep.yaml", [f"data.path={fmnist_small / 'train'}", "data.workers=0", "train.micro_batch=50",
                                                        "train.global_batch=100"])
    with pytest.raises(ConfigError, match="method.teacher is required"):
        build_training(cfg, DistEnv())


def test_bench_model_times_mae_with_and_without_a_teacher():
    from fastvit_pt.bench import bench_model

    res = bench_model("mae_vit_test", batch=8, img_size=28, patch_size=4, precision="fp32", attn=("math",), steps=2,
                      warmup=1, device="cpu", timm_reference=None, teacher="vit_test",
                      methods=("mae", "dmae", "d2mae"), method_settings={"decoder_block": 1})
    rows = {r["method"]: r for r in res["runs"]}
    assert set(rows) == {"mae", "dmae", "d2mae"} and rows["mae"]["ratio_vs_first"] == 1.0
    assert all(r["img_per_s"] > 0 and 0 < r["ratio_vs_first"] for r in rows.values())
    assert "teacher vit_test" in rows["dmae"]["name"]
    # each case's MFU is against its own FLOPs: the teacher's forward is counted in the distilled rows
    assert rows["dmae"]["gflops_per_image"] > rows["mae"]["gflops_per_image"] == res["train_gflops_per_image"]


def test_bench_model_refuses_a_setting_no_method_has():
    from fastvit_pt.bench import bench_model

    with pytest.raises(ConfigError, match="decoder_blok: none of the methods mae, dmae has them"):
        bench_model("mae_vit_test", batch=4, img_size=28, patch_size=4, device="cpu", timm_reference=None,
                    methods=("mae", "dmae"), method_settings={"decoder_blok": 1})
