"""Backbone import from the layouts people have (built here from our own modules: no downloads), and the
export that real timm loads with identical logits."""
import pytest
import torch
import torch.nn as nn

from fastvit_pt.engine.checkpoint import CheckpointError
from fastvit_pt.engine.backbone import export_for_timm, load_backbone, read_backbone
from fastvit_pt.models import create_model


def _mae():
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch16")


def _facebook_layout(mae):
    """facebookresearch/mae's models_mae keys: the encoder at the top level beside decoder_* and mask_token."""
    return {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in mae.state_dict().items()}


def _assert_encoder_loaded(vit, mae):
    enc = mae.encoder.state_dict()
    for k, v in vit.state_dict().items():
        if k in enc and not k.startswith(("norm.", "head.", "fc_norm.")):
            assert torch.equal(v, enc[k]), k


def test_mae_lite_layout_imports_and_reports_what_it_ignores(tmp_path):
    mae = _mae()
    fb = _facebook_layout(mae)
    ckpt = {"model": {**{"module.model." + k: v for k, v in fb.items()},
                      "module.teacher.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
                      "module.teacher.norm.weight": torch.zeros(3),
                      "module.adapter.proj.weight": torch.zeros(2, 2)},
            "optimizer": {}, "start_epoch": 400}
    path = tmp_path / "mae_lite_tiny.pth.tar"
    torch.save(ckpt, path)
    vit = create_model("vit_tiny_patch16", global_pool="avg", num_classes=10)
    report = load_backbone(vit, path)
    _assert_encoder_loaded(vit, mae)
    assert report.source.startswith("mae-lite checkpoint")
    assert report.ignored["teacher"] == 2 and report.ignored["adapter"] == 1
    assert report.ignored["decoder"] == sum(1 for k in fb if k.startswith(("decoder_", "mask_token")))
    assert report.ignored["final norm (avg pool uses fc_norm)"] == 2
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert not report.unexpected
    assert "teacher" in str(report) and "missing (left as initialised): fc_norm.bias, fc_norm.weight, head.bias" in str(report)


def test_facebook_mae_layout_imports(tmp_path):
    mae = _mae()
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": _facebook_layout(mae)}, path)
    vit = create_model("vit_tiny_patch16", num_classes=0)  # token pool: keeps the final norm
    report = load_backbone(vit, path)
    _assert_encoder_loaded(vit, mae)
    assert torch.equal(vit.norm.weight, mae.encoder.norm.weight)
    assert report.source.startswith("MAE checkpoint") and report.missing == []


def test_a_file_without_matching_blocks_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"layer1.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="none of its 1 encoder tensors match"):
        load_backbone(create_model("vit_test"), path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read .*cut.pt"):
        read_backbone(tmp_path / "cut.pt")


def test_timm_loads_the_export_with_identical_logits(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = create_model("vit_tiny_patch16", global_pool="avg", fc_norm=True, num_classes=1000).eval()
    path = export_for_timm(ours, tmp_path / "vit_tiny_fastvit.pt")
    ref = timm.create_model("vit_tiny_patch16_224", num_heads=12, global_pool="avg", fc_norm=True, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert a.abs().max() > 0.1  # real logits, not a zero head


def test_our_training_checkpoint_and_its_export_import_alike(fmnist_small, tmp_path):
    from conftest import tiny_mae_overrides
    from fastvit_pt.config import load_config
    from fastvit_pt.engine.loop import train

    res = train(load_config(None, tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"train.epochs": 1})))
    a = create_model("vit_test", img_size=28, patch_size=4, num_classes=0)
    b = create_model("vit_test", img_size=28, patch_size=4, num_classes=0)
    ra = load_backbone(a, res.checkpoint)  # the training checkpoint
    rb = load_backbone(b, tmp_path / "run" / "model-0001.pt")  # the backbone exported beside it
    assert ra.source.startswith("fastvit training checkpoint") and ra.ignored["decoder"] > 0
    assert ra.missing == rb.missing == [] and ra.loaded == rb.loaded
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert load_backbone(create_model("vit_test", img_size=28, patch_size=4), tmp_path / "run").loaded == ra.loaded


def test_timm_loads_a_finetuned_classifier_with_its_head(tmp_path):
    """A K-class fine-tuned export (model-best.pt's layout): timm keeps the head only when the overlay says K,
    otherwise it drops a classifier whose class count differs from the pretrained config's 1000."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = create_model("vit_tiny_patch16", img_size=28, patch_size=4, global_pool="avg", num_classes=10).eval()
    nn.init.normal_(ours.head.weight)
    path = export_for_timm(ours, tmp_path / "model-best.pt")
    ref = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, num_heads=12, global_pool="avg",
                            fc_norm=True, num_classes=10, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
