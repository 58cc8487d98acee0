"""The method contract: the one thing the loop, the engines, the CLI and bench know about a training method.

    out = engine(batch)            # method.forward(batch) -> {"loss": scalar, **parts}
    engine.backward(out["loss"]); engine.step()
    parts = method.after_step(step, total_steps)   # after each optimizer step: EMA updates, scalar schedules

A method declares the crops it needs (`views`), the backbone downstream tasks keep (`encoder`), its parameter
groups, and the modules it holds outside its own module tree (`hold`): a frozen teacher read from a file, or an
EMA copy (MoCo-v3's momentum encoder, DINO's teacher). Held modules are never optimised and never wrapped by DDP
or DeepSpeed (so never cast to 16 bits by DeepSpeed: an EMA kept in bf16 would lose most of each small update);
`saved=True` ones travel in every checkpoint. (timm's task `prepare_distributed`, DINOv2's SSLMetaArch,
solo-learn's BaseMethod.)
"""
from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import torch.nn as nn

from ..engine.optim import param_groups

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.config import ViewConfig

    from .configs import MethodConfig


class Method(nn.Module):
    def __init__(self, section: "MethodConfig"):
        super().__init__()
        self.section = section
        self._held: Dict[str, tuple] = {}  # name -> (module, saved); a dict, so nn.Module does not register them
        self.steps_done = 0
        """Optimizer steps taken so far, kept by the engine (after after_step, and on resume): a schedule read in
        forward (DINO's teacher temperature) reads it here. A plain int: reading it never syncs with a device; a
        forward under torch.compile should read a tensor set from it instead (DINO: a property whose setter fills
        one), since compiled code guards on ints it reads."""

    # -- what the method is -------------------------------------------------------------------------------
    @property
    def classifies(self) -> bool:
        """True for a classifier the loop may score on eval.path: encoder()(images) -> logits."""
        return type(self.section).classifies

    def views(self) -> "Optional[List[ViewConfig]]":
        """The crops each image is cut into (Batch.views); None: the data section's one training crop."""
        return self.section.views()

    def forward(self, batch) -> Dict[str, torch.Tensor]:  # pragma: no cover - the contract
        """batch -> {"loss": scalar to minimise, **parts: scalars the loop logs}."""
        raise NotImplementedError

    def encoder(self) -> nn.Module:  # pragma: no cover - the contract
        """The backbone downstream tasks keep (timm-compatible keys); what is exported and evaluated."""
        raise NotImplementedError

    def encoder_prefix(self) -> str:
        """Where encoder() sits in this method's state dict ("model.encoder."): recorded in checkpoints, so a
        reader finds the backbone without knowing the method."""
        enc = self.encoder()
        for name, module in self.named_modules():
            if module is enc:
                return f"{name}." if name else ""
        raise AssertionError(f"{type(self).__name__}.encoder() is not a submodule of the method")

    def param_groups(self, weight_decay: float) -> List[Dict]:
        """Optimizer groups over the trainable parameters: decayed matrices, undecayed biases and norms."""
        return param_groups(self, weight_decay)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> Dict[str, float]:
        """Called after optimizer step `step` (1-based) of `total_steps`: EMA updates and scalar schedules
        (momentum, temperature, ...). Returns the scalars to log."""
        return {}

    def describe(self) -> List[str]:
        """Lines `fastvit train --dry-run` prints about this method (its teacher, its init, ...)."""
        return []

    # -- modules held outside the module tree ---------------------------------------------------------------
    def hold(self, name: str, module: nn.Module, saved: bool) -> nn.Module:
        """Keep `module` outside the method's module tree: no gradients, no optimizer state, never wrapped or
        cast by an engine. saved=True (an EMA): fp32, in every checkpoint; False (a teacher from a file): not.
        Reach it through held()[name] or a property; assigning it to an attribute would register it."""
        module.requires_grad_(False)
        self._held[name] = (module, saved)
        return module

    def train(self, mode: bool = True):
        """Saved (EMA) held modules follow the method's mode (moco-v3's momentum encoder normalises with batch
        statistics while training); frozen teachers stay in eval mode."""
        super().train(mode)
        for module, saved in self._held.values():
            if saved:
                module.train(mode)
        return self

    def held(self) -> Dict[str, nn.Module]:
        return {name: m for name, (m, _) in self._held.items()}

    def place_held(self, device: torch.device) -> None:
        """Move held modules to the device (saved ones stay fp32 whatever the engine does to the method)."""
        for module, saved in self._held.values():
            module.to(device=device, dtype=torch.float32) if saved else module.to(device)

    def held_state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {name: m.state_dict() for name, (m, saved) in self._held.items() if saved}

    def load_held_state_dict(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        want = {name for name, (_, saved) in self._held.items() if saved}
        if set(state) != want:
            from ..engine.checkpoint import CheckpointError

            raise CheckpointError(f"the checkpoint holds the modules {sorted(state)} beside the method, and this "
                                  f"method holds {sorted(want)}: it was written by another method or version")
        for name in want:
            self._held[name][0].load_state_dict(state[name])


@torch.no_grad()
def ema_update_(ema: List[torch.Tensor], online: List[torch.Tensor], momentum: float) -> None:
    """ema <- momentum ema + (1 - momentum) online, in the EMA's (fp32) precision whatever the online weights'
    dtype (DeepSpeed bf16 casts the trained module)."""
    online = [p.detach().float() if p.dtype != e.dtype else p.detach() for p, e in zip(online, ema)]
    torch._foreach_mul_(ema, momentum)
    torch._foreach_add_(ema, online, alpha=1.0 - momentum)


def held_compute(x: torch.Tensor):
    """Context for a forward through an fp32 held module: where an engine casts the model and its batches to 16
    bits without autocast (DeepSpeed bf16), compute in the inputs' dtype and keep the weights fp32."""
    kind = x.device.type
    if x.dtype == torch.float32 or torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=x.dtype)


_LOCAL = threading.local()


@contextlib.contextmanager
def local_only():
    """Within it, a method acts as one process: no collective (gather_across_ranks, rank-synced statistics).
    For work on a private copy that other ranks do not mirror, such as counting FLOPs on the CPU under NCCL."""
    before = getattr(_LOCAL, "on", False)
    _LOCAL.on = True
    try:
        yield
    finally:
        _LOCAL.on = before


def world_size() -> int:
    """Ranks a method's collectives span: 1 outside a process group, and within local_only()."""
    dist = torch.distributed
    if getattr(_LOCAL, "on", False) or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank() -> int:
    return torch.distributed.get_rank() if world_size() > 1 else 0


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] on each rank -> [world * N, ...] in rank order, no gradient (moco-v3's concat_all_gather). A
    single process returns x itself."""
    world = world_size()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(out, x.contiguous())
    return torch.cat(out)
