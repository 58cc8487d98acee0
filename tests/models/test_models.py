"""Every registered model at a small input size: shapes, a gradient on every trainable parameter, no NaN."""
import pytest
import torch

from fastvit_pt.models import MaskedAutoencoderViT, VisionTransformer, create_model, list_models

SMALL = dict(img_size=32, patch_size=16)  # 4 patches: real widths and depths, seconds on CPU


@pytest.mark.parametrize("name", list_models())
def test_shapes_gradients_finite(name):
    torch.manual_seed(0)
    model = create_model(name, **SMALL)
    x = torch.randn(2, 3, 32, 32)
    if isinstance(model, MaskedAutoencoderViT):
        loss, pred, mask = model(x, mask_ratio=0.5)
        assert pred.shape == (2, 4, 16 * 16 * 3) and mask.shape == (2, 4)
        assert mask.sum(1).tolist() == [2.0, 2.0]
    else:
        model = create_model(name, num_classes=7, **SMALL)
        out = model(x)
        assert out.shape == (2, 7)
        loss = out.square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient reached {pname}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        else:
            assert pname.endswith("pos_embed"), f"{name}: unexpected frozen parameter {pname}"


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown model 'vit_tiny_patch61'\. Did you mean 'vit_tiny_patch16'.*vit_base_patch16"):
        create_model("vit_tiny_patch61")


@pytest.mark.parametrize(
    "name,dim,heads,dec",
    [
        ("mae_vit_tiny_patch16", 192, 12, (96, 1, 3)),
        ("mae_vit_small_patch16", 384, 12, (192, 1, 6)),
        ("mae_vit_base_patch16", 768, 12, (512, 8, 16)),
    ],
)
def test_mae_lite_sizes(name, dim, heads, dec):
    m = create_model(name, **SMALL)
    enc = m.encoder
    assert (enc.embed_dim, enc.depth, enc.num_heads) == (dim, 12, heads)
    blk = enc.blocks[0]
    assert blk.attn.qkv.bias is not None and blk.norm1.eps == 1e-6 and blk.mlp.fc1.out_features == 4 * dim
    d = m.decoder_blocks[0]
    assert (m.decoder_embed.out_features, len(m.decoder_blocks), d.attn.num_heads) == dec


def test_vit_tiny_matches_timm_keys_and_logits():
    timm = pytest.importorskip("timm")
    for pool in ("token", "avg"):
        ours = create_model("vit_tiny_patch16", global_pool=pool, num_classes=10).eval()
        ref = timm.create_model("vit_tiny_patch16_224", num_heads=12, global_pool=pool, num_classes=10).eval()
        ref.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_attention_logits_and_both_paths_agree():
    torch.manual_seed(0)
    sdpa = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=0).eval()
    math = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=0,
                             attn_impl="math").eval()
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, logits = sdpa.forward_features(x, attn_layers=(0, -1))
        torch.testing.assert_close(tokens, math.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tokens, sdpa.forward_features(x), rtol=1e-5, atol=1e-5)
    assert sorted(logits) == [0, 2]
    assert logits[2].shape == (2, 4, 17, 17)
    # logits are pre-softmax q.k^T/sqrt(d): recompute block 0's by hand
    blk = sdpa.blocks[0]
    h = blk.norm1(sdpa.prepend_cls(sdpa.embed_patches(x)))
    q, k, _ = blk.attn.qkv(h).reshape(2, 17, 3, 4, 12).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(logits[0], q @ k.transpose(-2, -1) / 12**0.5, rtol=1e-5, atol=1e-5)


def test_max_depth_stops_early():
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4, num_classes=0).eval()
    x = m.prepend_cls(m.embed_patches(torch.randn(1, 3, 32, 32)))
    with torch.no_grad():
        partial, logits = m.forward_tokens(x, attn_layers=(1,), max_depth=2)
        manual = m.blocks[1](m.blocks[0](x))
    torch.testing.assert_close(partial, manual)
    assert list(logits) == [1]


def test_relative_position_bias():
    from fastvit_pt.models.vit import relative_position_index

    idx = relative_position_index((2, 2))
    assert idx.shape == (5, 5) and idx[0, 0] == 3 * 3 + 2 and idx[0, 1] == 9 and idx[1, 0] == 10
    assert idx[1, 1] == idx[2, 2] == idx[4, 4] == 4  # zero offset: the centre of the 3 x 3 table
    assert idx[1, 2] == idx[3, 4] != idx[2, 1]  # same (dy, dx) shares an entry; the opposite offset does not
    torch.manual_seed(0)
    plain = create_model("vit_test", img_size=32, patch_size=8, num_classes=5).eval()
    rpe = create_model("vit_test_rpe", img_size=32, patch_size=8, num_classes=5).eval()
    missing = rpe.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == [f"blocks.{i}.attn.relative_position_bias_table" for i in range(2)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rpe(x), plain(x))  # zero-initialised: starts as the plain model
        for blk in rpe.blocks:
            blk.attn.relative_position_bias_table.normal_(std=0.5)
        biased = rpe(x)
        assert not torch.allclose(biased, plain(x))
        for blk in rpe.blocks:
            blk.attn.attn_impl = "math"
        torch.testing.assert_close(rpe(x), biased, rtol=1e-4, atol=1e-5)  # SDPA with the bias == explicit
    with pytest.raises(ValueError, match="RPE models are for fine-tuning"):
        rpe.blocks[0].attn(torch.randn(1, 7, 32))


def test_position_embedding_follows_the_input_size():
    """A 224-px ViT-Tiny reads 96-px crops (DINO's local views) and non-square inputs: its patch grid's position
    embedding is resampled exactly as timm's resample_abs_pos_embed does, and the model gives timm's
    (dynamic_img_size=True) logits at those sizes; at its own size nothing changes."""
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    m = create_model("vit_tiny_patch16", num_classes=10).eval()
    assert torch.equal(m.patch_pos_embed((14, 14)), m.pos_embed[:, 1:])
    for grid in ((6, 6), (7, 12), (20, 20)):
        want = resample_abs_pos_embed(m.pos_embed.detach(), list(grid), old_size=[14, 14], num_prefix_tokens=1)
        assert torch.equal(m.patch_pos_embed(grid).detach(), want[:, 1:])
    ref = timm.create_model("vit_tiny_patch16_224", num_heads=12, num_classes=10, dynamic_img_size=True).eval()
    ref.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        for size in ((96, 96), (112, 192)):
            x = torch.randn(2, 3, *size)
            assert m.forward_features(x).shape == (2, 1 + size[0] // 16 * size[1] // 16, 192)
            torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the model's 16-px patches"):
        m(torch.randn(1, 3, 100, 96))


def test_mae_refuses_another_size_by_name():
    from fastvit_pt.models import create_model

    mae = create_model("mae_vit_test", img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="input is 48x48 px but this MAE reconstructs 32x32"):
        mae(torch.randn(1, 3, 48, 48))


def test_hidden_out_counts_blocks_and_hidden_norm_is_mae_lites():
    """hidden_out key i is the residual stream after i blocks (0 = the embedded input), as mae-lite's RepCatcher
    indexes it; hidden_norm(i) is the LayerNorm it reads them through (block i's norm1, the final norm at depth)."""
    torch.manual_seed(0)
    vit = create_model("vit_test", img_size=28, patch_size=4, num_classes=0, attn_impl="math")
    x = vit.prepend_cls(vit.embed_patches(torch.randn(2, 3, 28, 28)))
    hidden = {i: None for i in range(vit.depth + 1)}
    out, _ = vit.forward_tokens(x, hidden_out=hidden)
    by_hand = [x]
    for blk in vit.blocks:
        by_hand.append(blk(by_hand[-1]))
    for i in range(vit.depth + 1):
        torch.testing.assert_close(hidden[i], by_hand[i])
    torch.testing.assert_close(out, vit.norm(by_hand[-1]))
    assert [vit.hidden_norm(i) for i in range(vit.depth + 1)] == [b.norm1 for b in vit.blocks] + [vit.norm]
    pooled = create_model("vit_test", img_size=28, patch_size=4, num_classes=0, global_pool="avg")
    assert pooled.hidden_norm(pooled.depth) is pooled.fc_norm  # the final norm moved after pooling
    with pytest.raises(ValueError, match="0..2"):
        vit.hidden_norm(3)
