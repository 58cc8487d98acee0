"""Model FLOPs, counted once, here: every MFU figure (bench model, bench e2e) divides by this count.

The count is measured, not modelled: one forward + backward of the real method on a small batch under
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; softmax, norms and activations
are not counted, as in every MFU convention), divided by the batch. For MAE
that is the encoder on the visible quarter of the patches plus the light decoder on all of them.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.nn as nn

# dense tensor-core peaks (FLOP/s) from the vendors' datasheets, without sparsity
GPU_PEAK = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
}


def train_flops_per_image(method: nn.Module, batch, samples: int = 2) -> float:
    """FLOPs of one training step (forward + backward) per image, on `samples` images of `batch`'s kind.

    `batch` is a pipelines Batch (or anything with .images/.labels/.keys); the count runs on a deep copy of
    `method` on the CPU in fp32, so the caller's model, optimizer state and RNG are untouched.
    """
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    def head(t):
        if t is None:
            return None
        t = t[:samples].detach().cpu()
        return t.float() if t.is_floating_point() else t

    small = type(batch)(*(head(t) for t in (batch.images, batch.labels, getattr(batch, "keys", None))),
                        **({"more_views": [head(v) for v in batch.more_views]} if getattr(batch, "more_views", None) else {}))
    clone = copy.deepcopy(method).cpu().float().train()
    if hasattr(clone, "place_held"):  # modules a method holds outside its tree (a momentum encoder) move too
        clone.place_held(torch.device("cpu"))
    for m in clone.modules():  # the CPU's fused attention kernel escapes the counter; explicit matmuls do not
        if hasattr(m, "attn_impl"):
            m.attn_impl = "math"
    from .methods.base import local_only

    # local_only: the CPU copy is this rank's alone; a collective on it would wait for the others (or find no
    # CPU backend under NCCL)
    with torch.random.fork_rng(devices=[]), local_only(), FlopCounterMode(display=False) as counter:
        clone(small)["loss"].backward()
    return counter.get_total_flops() / samples


def gpu_peak_key(name: str) -> Optional[str]:
    """The GPU_PEAK entry for a device name such as "NVIDIA H100 80GB HBM3" or "NVIDIA A100-SXM4-40GB": the
    model must match exactly, as a whole word (an "H200 NVL", "H100 NVL" or "A100X" is another part with other
    peaks, so it gets none rather than a neighbour's)."""
    import re

    words = re.sub(r"^NVIDIA\s+", "", name.strip()).replace("-", " ").split()
    for key in sorted(GPU_PEAK, key=len, reverse=True):  # "H100 PCIe" before "H100"
        n = len(key.split())
        if words[:n] == key.split():
            rest = words[n:]
            if not rest or rest[0] not in _OTHER_PARTS:
                return key
    return None


# a word after the model name that makes it a different part
_OTHER_PARTS = {"NVL", "PCIe", "CNX", "X"}


def peak_flops(device: torch.device, precision: str, measure_cpu: bool = True) -> Dict:
    """The peak an MFU is taken against: the datasheet figure for known GPUs, else (CPU) the measured rate
    of a large matrix multiply in the compute dtype, which is what this machine can actually sustain."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = gpu_peak_key(name)
        if key:
            return {"flops": GPU_PEAK[key][precision], "source": f"{key} datasheet, dense {precision}"}
        return {"flops": None, "source": f"no datasheet peak for {name}"}
    if not measure_cpu:
        return {"flops": None, "source": "not measured"}
    from .distributed.env import cpu_has_native_bf16

    if precision != "fp32" and not cpu_has_native_bf16():
        # 16-bit matmuls are emulated here (and slower than fp32): the machine's peak is its fp32 rate
        return {"flops": measured_matmul_flops(device, "fp32"), "source": "measured fp32 2048^3 matmul (no native bf16)"}
    return {"flops": measured_matmul_flops(device, precision), "source": f"measured {precision} 2048^3 matmul"}


def measured_matmul_flops(device: torch.device, precision: str, n: int = 2048, reps: int = 5) -> float:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best: Optional[float] = None
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return 2 * n**3 / best


def mfu(img_per_s: Optional[float], flops_per_image: float, peak: Optional[float]) -> Optional[float]:
    if not img_per_s or not peak:
        return None
    return round(img_per_s * flops_per_image / peak, 4)
