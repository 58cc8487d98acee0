"""Training methods: one file each, each a `base.Method` whose forward(batch) returns {"loss": ..., parts}.

The loop knows only that contract. A method's config section (`method: {name: ..., ...}`) is registered in
configs.py, torch-free; its module's `build(section, model_cfg, plan)` makes it from that section, the model
section and the run plan (attention implementation, number of classes, rank).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, List

from .configs import method_names

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ModelConfig
    from ..engine.plan import RunPlan
    from .base import Method
    from .configs import MethodConfig


def list_methods() -> List[str]:
    return method_names()


def build_method(section: "MethodConfig", model: "ModelConfig", plan: "RunPlan") -> "Method":
    """The Method for `section` (validated by the config: its name is registered)."""
    method = importlib.import_module(type(section).module).build(section, model, plan)
    from .base import Method

    assert isinstance(method, Method), f"{type(section).module}.build returned a {type(method).__name__}, not a Method"
    return method


def build_standalone(cfg, num_classes: int = 1000, attn_impl: "str | None" = None) -> "Method":
    """The method a Config describes, outside a run (analysis, tests): one process, the CPU plan."""
    import dataclasses

    from ..distributed.env import DistEnv
    from ..engine.plan import make_plan

    # the run's own precision may need its device (fp16: CUDA); here the method is built for the CPU
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, precision="fp32", device="cpu"))
    plan = make_plan(cfg, DistEnv())
    plan.num_classes = num_classes
    if attn_impl:
        plan.attn_impl = attn_impl
    return build_method(cfg.method, cfg.model, plan)
