"""Parallelism applied from outside the model: rank/world from the launcher's environment, and the engines
(plain torch / DDP, DeepSpeed) behind one interface. Nothing here launches processes."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from ..config import Config
    from .base import Engine
    from .env import DistEnv

# engine.kind -> "module:class", imported only when chosen (deepspeed takes seconds to import)
_ENGINES = {
    "torch": "fastvit_pt.distributed.torch_engine:TorchEngine",
    "deepspeed": "fastvit_pt.distributed.deepspeed_engine:DeepSpeedEngine",
}


def build_engine(method: "nn.Module", cfg: "Config", env: "DistEnv", steps_per_epoch: int) -> "Engine":
    module, cls = _ENGINES[cfg.engine.kind].split(":")
    try:
        engine_cls = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ImportError(
            f"engine.kind={cfg.engine.kind} needs {err.name}: pip install -e '.[{cfg.engine.kind}]'"
        ) from err
    return engine_cls(method, cfg, env, steps_per_epoch)
