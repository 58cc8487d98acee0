"""Build the command line of an existing launcher (torchrun or the deepspeed launcher) for `fastvit train`.

Nothing is launched here: `fastvit launch` prints the command and execs it, so the standard launcher does
all process management (spawning, rank assignment, rendezvous, killing the job when one rank dies).
"""
from __future__ import annotations

import shutil
import sys
from typing import List, Optional, Sequence

LAUNCHERS = ("torchrun", "deepspeed")


def _launcher_exe(name: str) -> str:
    """The launcher next to this interpreter (the venv's), else on PATH."""
    from pathlib import Path

    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def launch_command(
    train_args: Sequence[str],
    launcher: str = "torchrun",
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: Optional[int] = None,
    master_addr: Optional[str] = None,
    master_port: int = 29500,
    hostfile: Optional[str] = None,
) -> List[str]:
    """The launcher's argv that runs `fastvit train <train_args>` on every rank."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"--nproc-per-node and --nnodes must be >= 1, got {nproc_per_node} and {nnodes}")
    train = ["-m", "fastvit_pt.cli", "train", *train_args]
    if launcher == "torchrun":
        if hostfile:
            raise ValueError("--hostfile is the deepspeed launcher's; torchrun runs once per node (see README: multi-node)")
        cmd = [_launcher_exe("torchrun"), f"--nproc_per_node={nproc_per_node}"]
        if nnodes == 1:
            cmd += ["--standalone"]  # a local rendezvous on a free port
        else:
            if not master_addr:
                raise ValueError("--nnodes > 1 with torchrun needs --master-addr (the host of node 0)")
            # c10d rendezvous: every node runs the same line; ranks are assigned at rendezvous
            cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={master_addr}:{master_port}"]
            if node_rank is not None:
                cmd += [f"--node_rank={node_rank}"]
        return cmd + train
    cmd = [_launcher_exe("deepspeed")]
    if hostfile:
        cmd += ["--hostfile", hostfile, "--num_nodes", str(nnodes)]
    elif nnodes > 1:
        raise ValueError("--nnodes > 1 with the deepspeed launcher needs --hostfile (lines of 'host slots=N')")
    cmd += ["--num_gpus", str(nproc_per_node), "--master_port", str(master_port)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    return cmd + ["--module"] + train[1:]
