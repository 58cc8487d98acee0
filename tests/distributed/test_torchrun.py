"""Real multi-process training: torchrun, 2 CPU ranks over gloo, DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_mae_overrides

REPO = Path(__file__).resolve().parents[2]


def torchrun(*args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "fastvit_pt.cli", "train", "recipes/demo/mae_fmnist.yaml", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_ddp_run_and_exact_resume(fmnist_small, tmp_path):
    data = fmnist_small / "train"
    over = lambda out, **kw: tiny_mae_overrides(data, out, **{"train.micro_batch": 25, **kw})  # noqa: E731
    full = torchrun(*over(tmp_path / "full"), port=29611)
    assert full.stdout.count("checkpoint:") == 1  # only rank 0 reports
    torchrun(*over(tmp_path / "part", **{"train.stop_after_epochs": 1}), port=29612)
    torchrun(*over(tmp_path / "part"), "--resume", port=29613)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == 15 and a == b  # 3 epochs x 5 steps; each rank restored its own RNG
    assert a[-1] < a[0]
