"""Rank, world size and device from the standard launcher variables (torchrun, the deepspeed launcher,
SLURM through either). Nothing here launches processes."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"engine.device={pref!r} but CUDA is not available here; use engine.device=cpu")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or amx_bf16 in the CPU flags (Linux); elsewhere oneDNN's own answer."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(pref: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA and on CPUs with native bf16, else fp32 (on an AVX2-only CPU a bf16 MAE-Tiny
    step measured ~10x slower than fp32: benchmarks/results/cpu_model.md)."""
    if pref != "auto":
        return pref
    if device.type == "cuda" or cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def init_distributed(device_pref: str = "auto", timeout_s: int = 600, group_of_one: bool = False) -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK; with more than one rank, join the process group (NCCL on GPU,
    gloo on CPU). A bounded timeout makes a dead peer an error instead of a hang. `group_of_one`: a single
    process still gets a (one-rank, in-memory) group, which DeepSpeed needs; no address or port is used."""
    world = _int_env("WORLD_SIZE", 1)
    rank, local_rank = _int_env("RANK", 0), _int_env("LOCAL_RANK", 0)
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun or the deepspeed launcher")
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    elif world == 1 and group_of_one and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", store=torch.distributed.HashStore(), rank=0,
            world_size=1, timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistEnv(rank, world, local_rank, device)


def shutdown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
