"""Registered sizes. Encoders follow mae-lite (12 heads at every width: Tiny 192-d has 16-d heads);
MAE decoders follow mae-lite's Table: Tiny 96 x 1 x 3, Small 192 x 1 x 6, Base 512 x 8 x 16."""
from __future__ import annotations

from .mae import MaskedAutoencoderViT
from .registry import register_model
from .vit import VisionTransformer

# name -> (embed_dim, depth, num_heads), and the matching MAE decoder (dim, depth, heads)
_ENCODERS = {"test": (32, 2, 2), "tiny": (192, 12, 12), "small": (384, 12, 12), "base": (768, 12, 12)}
_DECODERS = {"test": (16, 1, 2), "tiny": (96, 1, 3), "small": (192, 1, 6), "base": (512, 8, 16)}


def _vit(size: str, **kw) -> VisionTransformer:
    dim, depth, heads = _ENCODERS[size]
    return VisionTransformer(**{"patch_size": 16, "embed_dim": dim, "depth": depth, "num_heads": heads, **kw})


def _mae(size: str, **kw) -> MaskedAutoencoderViT:
    dim, depth, heads = _ENCODERS[size]
    ddim, ddepth, dheads = _DECODERS[size]
    return MaskedAutoencoderViT(
        **{
            "patch_size": 16,
            "embed_dim": dim,
            "depth": depth,
            "num_heads": heads,
            "decoder_embed_dim": ddim,
            "decoder_depth": ddepth,
            "decoder_num_heads": dheads,
            **kw,
        }
    )


@register_model
def vit_test(**kw) -> VisionTransformer:
    """A 2-block, 32-d ViT for tests."""
    return _vit("test", **kw)


@register_model
def vit_tiny_patch16(**kw) -> VisionTransformer:
    return _vit("tiny", **kw)


@register_model
def vit_tiny_patch16_rpe(**kw) -> VisionTransformer:
    """ViT-Tiny with a relative position bias in every block (BEiT-style), for fine-tuning."""
    return _vit("tiny", **{"rel_pos_bias": True, **kw})


@register_model
def vit_test_rpe(**kw) -> VisionTransformer:
    """vit_test with relative position bias, for tests."""
    return _vit("test", **{"rel_pos_bias": True, **kw})


@register_model
def vit_small_patch16(**kw) -> VisionTransformer:
    return _vit("small", **kw)


@register_model
def vit_base_patch16(**kw) -> VisionTransformer:
    return _vit("base", **kw)


@register_model
def mae_vit_test(**kw) -> MaskedAutoencoderViT:
    """MAE around vit_test, for tests."""
    return _mae("test", **kw)


@register_model
def mae_vit_tiny_patch16(**kw) -> MaskedAutoencoderViT:
    return _mae("tiny", **kw)


@register_model
def mae_vit_small_patch16(**kw) -> MaskedAutoencoderViT:
    return _mae("small", **kw)


@register_model
def mae_vit_base_patch16(**kw) -> MaskedAutoencoderViT:
    return _mae("base", **kw)
