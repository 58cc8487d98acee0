"""Real multi-process training with the torch engine: torchrun, 2 CPU ranks over gloo, DDP."""
import os
import signal
import subprocess
import time

import pytest
import torch
from launchers import ENV, REPO, assert_same_run, final_params, losses, run, single_cmd, torchrun_cmd

from conftest import tiny_mae_overrides


def test_two_rank_ddp_equals_one_rank(fmnist_small, one_rank_reference, tmp_path):
    out = tmp_path / "ddp"
    r = run(torchrun_cmd(2, 29611, *tiny_mae_overrides(fmnist_small / "train", out, **{"train.micro_batch": 25})))
    assert r.stdout.count("checkpoint:") == 1  # only rank 0 reports
    assert_same_run(out, one_rank_reference)


def test_two_rank_ddp_resume_is_exact(fmnist_small, tmp_path):
    over = lambda out, **kw: tiny_mae_overrides(fmnist_small / "train", out, **{"train.micro_batch": 25, **kw})  # noqa: E731
    run(torchrun_cmd(2, 29612, *over(tmp_path / "full")))
    run(torchrun_cmd(2, 29613, *over(tmp_path / "part", **{"train.stop_after_epochs": 1})))
    run(torchrun_cmd(2, 29614, *over(tmp_path / "part"), "--resume"))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == 15 and a == b  # 3 epochs x 5 steps; each rank restored its own RNG, bit for bit
    assert a[-1] < a[0]


def test_batch_not_divisible_by_world_size_fails_before_any_work(fmnist_small, tmp_path):
    out = tmp_path / "run"
    t = time.perf_counter()
    r = run(torchrun_cmd(2, 29615, *tiny_mae_overrides(fmnist_small / "train", out, **{"train.micro_batch": 100})),
            ok=False)
    assert r.returncode != 0
    # each rank says it in one line (torchrun then adds its own summary); no stack from our code
    assert r.stderr.count("Error: train.global_batch (100) is not a multiple of train.micro_batch (100) x world size (2)") == 2
    assert "fastvit_pt/" not in r.stderr
    assert not out.exists()  # nothing was written: the check runs before data, model or run directory
    assert time.perf_counter() - t < 60


def _wait_for_training(run_dir, proc, timeout=120):
    t = time.perf_counter()
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.perf_counter() - t < timeout, "training never started"
        time.sleep(0.2)


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_killed_rank_stops_the_others(fmnist_small, tmp_path, engine):
    """No launcher to clean up: rank 1 is SIGKILLed mid-training, and rank 0 must fail on its own, quickly,
    with an error that says what happened, not hang in a collective."""
    out = tmp_path / "run"
    over = tiny_mae_overrides(fmnist_small / "train", out, **{"train.micro_batch": 25, "train.epochs": 100,
                                                              "train.log_every": 1, "engine.kind": engine,
                                                              "engine.dist_timeout_s": 30})
    port = 29616 if engine == "torch" else 29617
    procs = [
        subprocess.Popen(single_cmd(*over), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for r in range(2)
    ]
    try:
        _wait_for_training(out, procs[0])
        os.kill(procs[1].pid, signal.SIGKILL)
        t = time.perf_counter()
        output, _ = procs[0].communicate(timeout=90)
        waited = time.perf_counter() - t
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert "rank 0: lost contact with another rank" in output, output[-3000:]
    assert waited < 60, f"rank 0 took {waited:.0f} s to notice"


def test_torchrun_stops_the_job_when_a_rank_dies(fmnist_small, tmp_path):
    out = tmp_path / "run"
    over = tiny_mae_overrides(fmnist_small / "train", out, **{"train.micro_batch": 25, "train.epochs": 100,
                                                              "train.log_every": 1})
    p = subprocess.Popen(torchrun_cmd(2, 29618, *over), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=ENV)
    try:
        _wait_for_training(out, p)
        workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGKILL)
        t = time.perf_counter()
        p.communicate(timeout=90)
        assert p.returncode != 0 and time.perf_counter() - t < 60
    finally:
        p.kill()


def test_fastvit_launch_execs_torchrun(fmnist_small, one_rank_reference, tmp_path):
    """`fastvit launch` prints the standard launcher's command and execs it; the run is the same run."""
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastvit_pt.cli", "launch", "--nproc-per-node", "2", "recipes/demo/mae_fmnist.yaml",
           *tiny_mae_overrides(fmnist_small / "train", out, **{"train.micro_batch": 25})]
    r = run(cmd)
    first = r.stderr.splitlines()[0]
    assert "torchrun --nproc_per_node=2 --standalone -m fastvit_pt.cli train recipes/demo/mae_fmnist.yaml" in first
    assert_same_run(out, one_rank_reference)


def test_launch_command_lines():
    from fastvit_pt.distributed.launch import launch_command

    ds = launch_command(["r.yaml", "a=1"], "deepspeed", 8, nnodes=4, hostfile="hosts")
    assert ds[1:] == ["--hostfile", "hosts", "--num_nodes", "4", "--num_gpus", "8", "--master_port", "29500", "--module",
                      "fastvit_pt.cli", "train", "r.yaml", "a=1"]
    tr = launch_command(["r.yaml"], "torchrun", 8, nnodes=4, master_addr="node0")
    assert tr[1:] == ["--nproc_per_node=8", "--nnodes=4", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29500",
                      "-m", "fastvit_pt.cli", "train", "r.yaml"]
    with pytest.raises(ValueError, match="needs --master-addr"):
        launch_command(["r.yaml"], "torchrun", 8, nnodes=2)
    with pytest.raises(ValueError, match="needs --hostfile"):
        launch_command(["r.yaml"], "deepspeed", 8, nnodes=2)


def test_two_rank_compiled_ddp_matches_one_rank_eager(fmnist_small, one_rank_reference, tmp_path):
    """engine.compile=true under DDP (dynamo splits the graph at DDP's buckets): 2 ranks x 25 compiled reproduce
    the eager 1-rank run's losses within 1e-3 (relative; inductor reorders fp32 arithmetic) and its weights."""
    out = tmp_path / "ddp_compiled"
    run(torchrun_cmd(2, 29615, *tiny_mae_overrides(fmnist_small / "train", out, **{
        "train.micro_batch": 25, "engine.compile": True})))
    a, b = losses(out), losses(one_rank_reference)
    assert len(a) == len(b) == 15 and a == pytest.approx(b, rel=1e-3)
    pa, pb = final_params(out), final_params(one_rank_reference)
    for k in pa:
        torch.testing.assert_close(pa[k].float(), pb[k].float(), rtol=0, atol=2e-3, msg=k)


def test_the_policy_probe_on_rank_0_does_not_wait_for_the_other_ranks(fmnist_small, tmp_path):
    """`auto` measured for real in a 2-rank MoCo-v3 run: rank 0 times the step alone (MoCo-v3's forward
    all-gathers keys across ranks: the probe must keep that local) while rank 1 waits for the broadcast choice;
    the run completes and reports the choice once."""
    out = tmp_path / "moco"
    r = run(torchrun_cmd(2, 29616, *tiny_mae_overrides(fmnist_small / "train", out, **{
        "train.micro_batch": 25, "train.epochs": 1, "method.name": "mocov3", "method.mlp_dim": 64, "method.dim": 16,
        "engine.precision": "fp32", "model.attn_impl": "auto"})),
        env={"FASTVIT_PROBE": "1", "FASTVIT_CACHE_DIR": str(tmp_path / "cache")}, timeout=240)
    assert r.stderr.count("step policy     fp32") == 1 and "(probe)" in r.stderr
    assert len(losses(out)) == 5
