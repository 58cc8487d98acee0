"""SimMIM against microsoft/SimMIM's definitions: MaskGenerator's block masks, VisionTransformerForSimMIM's mask-token
replacement before the position embedding, the L1 loss over masked pixels, the no-decay list, and a backbone that
loads into timm and is found in the checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_mae_overrides
from fastvit_pt.config import ModelConfig, load_config
from fastvit_pt.methods.configs import SimMIMConfig
from fastvit_pt.methods.simmim import SimMIM, block_masks, build
from fastvit_pt.models import create_model
from pipelines.base import Batch, sample_seeds


def _method(img_size=32, mask_patch_size=8, mask_ratio=0.6):
    torch.manual_seed(0)
    enc = create_model("vit_test", img_size=img_size, patch_size=4, num_classes=0, attn_impl="math")
    return SimMIM(enc, SimMIMConfig(mask_ratio=mask_ratio, mask_patch_size=mask_patch_size))


@pytest.mark.parametrize("img_size, mask_patch_size, cells, masked", [(32, 8, 16, 10), (28, 4, 49, 30), (32, 16, 4, 3)])
def test_masks_are_maskgenerators_blocks_drawn_from_the_key(img_size, mask_patch_size, cells, masked):
    """ceil(cells x 0.6) cells per sample (49 x 0.6 = 29.4 -> 30: a ceil, not a round), each a full block of
    (mask_patch_size / patch)^2 patches; a pure function of the sample's key."""
    m = _method(img_size, mask_patch_size)
    assert m.mask_count == masked == math.ceil(cells * 0.6)
    keys = sample_seeds(0, 0, range(8))
    mask = m.masks(8, keys, torch.device("cpu"))
    g, s = img_size // 4, mask_patch_size // 4
    assert mask.shape == (8, g, g)
    blocks = mask.view(8, g // s, s, g // s, s)
    assert torch.equal(blocks.amin(dim=(2, 4)), blocks.amax(dim=(2, 4)))  # every cell all masked or all visible
    assert (blocks[:, :, 0, :, 0].sum(dim=(1, 2)) == masked).all()
    assert torch.equal(mask, m.masks(8, keys, torch.device("cpu")))
    assert torch.equal(mask[3:5], m.masks(2, keys[3:5], torch.device("cpu")))  # any split of the batch, any rank
    distinct = len({tuple(x.flatten().tolist()) for x in mask})  # different keys, different masks (of 4 possible
    assert distinct == 8 if math.comb(cells, masked) > 1000 else distinct > 1  # ones at 4 cells: some repeat)
    free = m.masks(8, None, torch.device("cpu"))  # no keys: the global RNG, same counts
    assert (free.view(8, g // s, s, g // s, s)[:, :, 0, :, 0].sum(dim=(1, 2)) == masked).all()


def _simmim_reference_encoder(m: SimMIM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VisionTransformerForSimMIM.forward, line by line, on the method's own weights."""
    vit = m.backbone
    x = vit.patch_embed(x)
    B, L, _ = x.shape
    mask_token = m.mask_token.expand(B, L, -1)
    w = mask.flatten(1).unsqueeze(-1).type_as(mask_token)
    x = x * (1 - w) + mask_token * w
    x = torch.cat((vit.cls_token.expand(B, -1, -1), x), dim=1)
    x = x + vit.pos_embed
    for blk in vit.blocks:
        x = blk(x)
    x = vit.norm(x)[:, 1:]
    B, L, C = x.shape
    H = W = int(L**0.5)
    return x.permute(0, 2, 1).reshape(B, C, H, W)


def test_masked_tokens_enter_the_blocks_as_mask_token_plus_position():
    m = _method().eval()
    x = torch.randn(3, 3, 32, 32)
    mask = m.masks(3, sample_seeds(0, 0, range(3)), torch.device("cpu"))
    seen = {}
    hook = m.backbone.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    try:
        z = m.forward_encoder(x, mask)
    finally:
        hook.remove()
    tokens, pos = seen["x"], m.backbone.pos_embed.detach()
    masked = mask.flatten(1).bool()
    with torch.no_grad():
        patches = m.backbone.patch_embed(x)
    torch.testing.assert_close(tokens[:, 0], (m.backbone.cls_token[0, 0] + pos[0, 0]).detach().expand(3, -1))
    want_masked = (m.mask_token[0, 0] + pos[0, 1:]).detach().expand(3, -1, -1)
    torch.testing.assert_close(tokens[:, 1:][masked], want_masked[masked])
    torch.testing.assert_close(tokens[:, 1:][~masked], (patches + pos[:, 1:])[~masked])
    with torch.no_grad():
        torch.testing.assert_close(z, _simmim_reference_encoder(m, x, mask))
    assert z.shape == (3, 32, 8, 8)


def test_loss_is_l1_over_masked_pixels_only():
    """SimMIM's loss on a hand-built case: one 4x4-px patch of four masked, so 16 pixels x 3 channels count."""
    m = _method(img_size=8, mask_patch_size=4)
    g = torch.Generator().manual_seed(0)
    x, x_rec = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    mask = torch.tensor([[[0, 1], [0, 0]]])  # row 0, column 1: pixels [0:4, 4:8]
    want = (x - x_rec)[..., 0:4, 4:8].abs().sum() / (16 + 1e-5) / 3
    loss = m.forward_loss(x, x_rec, mask)
    torch.testing.assert_close(loss, want)
    moved = x_rec.clone()
    moved[..., 6, 1] += 5.0  # an unmasked pixel: no change
    torch.testing.assert_close(m.forward_loss(x, moved, mask), loss, rtol=0, atol=0)
    moved[..., 2, 5] += 5.0  # a masked one: the loss moves
    assert m.forward_loss(x, moved, mask) > loss
    assert m.forward_loss(x.bfloat16(), x_rec.bfloat16(), mask).dtype == torch.float32


def test_forward_gives_a_finite_loss_and_decoder_maps_back_to_pixels():
    m = _method()
    x = torch.randn(4, 3, 32, 32)
    out = m(Batch(x, torch.zeros(4, dtype=torch.long), sample_seeds(0, 0, range(4))))
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    assert m.decoder(torch.zeros(1, 32, 8, 8)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="model.img_size=32"):
        m(Batch(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)))


def test_no_weight_decay_on_positions_cls_biases_and_norms_as_simmims_vit():
    """SimMIM's VisionTransformer.no_weight_decay is {pos_embed, cls_token}: its 3-D mask token is decayed (only
    SimMIM's Swin lists it)."""
    m = _method()
    decay, no_decay = m.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    vit = m.backbone
    for p in (vit.pos_embed, vit.cls_token, vit.norm.weight, vit.blocks[0].attn.qkv.bias, m.decoder[0].bias):
        assert id(p) in ids(no_decay) and id(p) not in ids(decay)
    for p in (m.mask_token, vit.blocks[0].attn.qkv.weight, vit.patch_embed.proj.weight, m.decoder[0].weight):
        assert id(p) in ids(decay)
    assert len(ids(decay)) + len(ids(no_decay)) == sum(1 for _ in m.parameters())


@pytest.mark.parametrize("img_size, mask_patch_size", [(28, 8), (32, 6), (32, 64)])
def test_bad_mask_patch_size_names_the_keys(img_size, mask_patch_size):
    model = ModelConfig(name="mae_vit_test", img_size=img_size, patch_size=4)
    plan = type("Plan", (), {"attn_impl": "math"})()
    with pytest.raises(ValueError, match=r"method.mask_patch_size=.* model.patch_size=4 .* model.img_size="):
        build(SimMIMConfig(mask_patch_size=mask_patch_size), model, plan)


def test_section_validates_and_takes_its_own_defaults():
    from fastvit_pt.config import ConfigError

    cfg = load_config(None, ["method.name=simmim"])  # from the default MAE section: SimMIM's 0.6, not MAE's 0.75
    assert (cfg.method.mask_ratio, cfg.method.mask_patch_size) == (0.6, 32)
    for bad, key in (("method.mask_ratio=1.0", "method.mask_ratio"), ("method.mask_ratio=0", "method.mask_ratio"),
                     ("method.mask_patch_size=0", "method.mask_patch_size")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["method.name=simmim", bad])


def test_backbone_loads_into_timm_and_is_found_in_the_checkpoint(fmnist_small, tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from fastvit_pt.engine.backbone import read_backbone
    from fastvit_pt.engine.checkpoint import model_path
    from fastvit_pt.engine.loop import train

    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"method.name": "simmim", "train.epochs": 1,
                                                                           "model.img_size": 32})
    res = train(load_config(None, over + ["method.mask_patch_size=8"]))
    exported = torch.load(model_path(tmp_path / "run", 1), weights_only=True)
    timm_vit = TimmViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    timm_vit.load_state_dict(exported)  # strict: every key, every shape; no mask_token, no decoder
    from_ckpt, desc, ignored = read_backbone(res.checkpoint)  # the prefix the checkpoint records: backbone.
    # the rest: the head's conv weight and bias, and the mask token (counted with the decoder keys)
    assert from_ckpt.keys() == exported.keys() and set(ignored) == {"decoder"} and ignored["decoder"] == 3
    for k, v in exported.items():
        torch.testing.assert_close(from_ckpt[k].float(), v)
    x = torch.randn(2, 3, 32, 32)
    ours = create_model("vit_test", img_size=32, patch_size=4, num_classes=0, attn_impl="math")
    ours.load_state_dict(exported)
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.eval()(x), ours.eval()(x), rtol=1e-4, atol=1e-4)
