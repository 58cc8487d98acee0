"""Training methods: one file each, each a module whose forward(batch) returns {"loss": ..., parts}.

The loop knows only that contract. A method is built from the config; runtime objects (a teacher module,
the device) are keyword arguments of its builder.
"""
from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Dict, List

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from ..config import Config

# name -> module exposing `build(cfg, **runtime) -> nn.Module`
_METHODS: Dict[str, str] = {
    "mae": "fastvit_pt.methods.mae",
    "dmae": "fastvit_pt.methods.dmae",
    "d2mae": "fastvit_pt.methods.d2mae",
    "finetune": "fastvit_pt.methods.finetune",
}


def list_methods() -> List[str]:
    return sorted(_METHODS)


def build_method(cfg: "Config", **runtime) -> "nn.Module":
    name = cfg.method.name
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"method.name: unknown method {name!r}.{hint} Known methods: {', '.join(list_methods())}")
    return importlib.import_module(_METHODS[name]).build(cfg, **runtime)
