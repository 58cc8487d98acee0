"""Architectures only. Never imports pipelines, deepspeed or torch.distributed."""
from . import variants  # noqa: F401  (registers the models)
from .mae import MaskedAutoencoderViT, num_visible, patchify, random_masking, unpatchify
from .registry import create_model, list_models, register_model
from .vit import VisionTransformer

__all__ = [
    "MaskedAutoencoderViT",
    "VisionTransformer",
    "create_model",
    "list_models",
    "num_visible",
    "patchify",
    "random_masking",
    "register_model",
    "unpatchify",
]
