"""Engines: how a method's steps run (plain torch / DDP, DeepSpeed), behind one interface (base.Engine).
Parallelism is applied here, from outside the model; the loop names no engine."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Type

if TYPE_CHECKING:  # pragma: no cover
    from .base import Engine

# engine.kind -> "module:class", imported only when chosen (deepspeed takes seconds to import)
_ENGINES = {
    "torch": "fastvit_pt.engines.torch_engine:TorchEngine",
    "deepspeed": "fastvit_pt.engines.deepspeed_engine:DeepSpeedEngine",
}


def engine_class(kind: str) -> "Type[Engine]":
    module, cls = _ENGINES[kind].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ImportError(f"engine.kind={kind} needs {err.name}: pip install -e '.[{kind}]'") from err


def init_for(engine_cfg):
    """init_distributed for a run of this engine kind: rank, world and device from the launcher's environment,
    and a one-rank process group where the engine needs one even alone."""
    from ..distributed.env import init_distributed

    return init_distributed(engine_cfg.device, engine_cfg.dist_timeout_s,
                            group_of_one=engine_class(engine_cfg.kind).needs_process_group)
