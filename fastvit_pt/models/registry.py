"""Models by name (timm's @register_model): a variant is a short function of keyword overrides."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(prefix: str = "") -> List[str]:
    return sorted(n for n in _MODELS if n.startswith(prefix))


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
