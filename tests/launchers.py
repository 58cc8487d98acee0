"""Run `fastvit train` for real under the standard launchers (torchrun, the deepspeed launcher) or as one
plain process, and read back what the run wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/demo/mae_fmnist.yaml"
# one intra-op thread per rank: two ranks share this machine's cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun_cmd(nproc: int, port: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
            "-m", "fastvit_pt.cli", "train", RECIPE, *args]


def deepspeed_cmd(nproc: int, port: int, *args) -> list:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
            "--module", "fastvit_pt.cli", "train", RECIPE, *args]


def single_cmd(*args) -> list:
    return [sys.executable, "-m", "fastvit_pt.cli", "train", RECIPE, *args]


def run(cmd: list, ok: bool = True, timeout: int = 300, env: dict = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout)
    if ok:
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def losses(run_dir: Path) -> list:
    """The training losses logged, in order (evaluation and k-NN rows carry none)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def final_params(run_dir: Path) -> dict:
    """The whole method's parameters from the newest checkpoint, whichever engine wrote it."""
    from fastvit_pt.engine.checkpoint import latest_checkpoint, load_checkpoint, method_state_dict

    ckpt = latest_checkpoint(run_dir)
    return method_state_dict(ckpt, load_checkpoint(ckpt))


def assert_same_run(a, b):
    """Same losses and final parameters, up to float summation order (2 x 25 vs 1 x 50 samples per step)."""
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k].float(), pb[k].float(), rtol=0, atol=1e-3, msg=k)
