"""benchmarks/gpu_bench.sh, the script a lent GPU machine runs once with no second try, as its CPU dry run:
every step of it at test size, on this machine, through the same commands and the same step bookkeeping."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the GPU machine runs; DALI and FFCV are not there (their variants only log a skip), so the dry run,
# which must stay well under 2 minutes on 2 cores, leaves them out too
STEPS = ("model", "e2e_torchvision", "loader", "teacher", "ablation", "e2e_deepspeed")
LINE = re.compile(r"^(\S+)\s+(?:start (\S+)\s+end (\S+)\s+([\d.]+) s\s+(.*)|skipped: (.*))$")


def test_dry_run_runs_every_step_and_writes_plausible_json(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "DATA"}  # DATA would reuse a tree instead of making one
    r = subprocess.run(["bash", "benchmarks/gpu_bench.sh", "--device", "cpu", "--tiny", "--out", str(out),
                        "--only", ",".join(STEPS)], cwd=REPO, env={**env, "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=600)
    log = (out / "steps.log").read_text()
    assert r.returncode == 0, log + r.stdout[-3000:]

    ran, skipped = {}, {}
    for line in log.splitlines():
        if line.startswith(" "):  # a note, or a failed step's output
            continue
        m = LINE.match(line)
        assert m, f"unexpected steps.log line: {line!r}"
        if m[6] is not None:
            skipped[m[1]] = m[6]
        else:
            ran[m[1]] = m[5]
    # deepspeed is installed wherever the tests run (CI too); only where it is not may its e2e step be skipped
    ds = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode == 0
    assert ran == {name: "ok" for name in ("env", "data", *STEPS) if ds or name != "e2e_deepspeed"}, log
    # the wheels step installs only what this python lacks: nothing here, or there is no .whl/
    assert set(skipped) == {"wheels"} | (set() if ds else {"e2e_deepspeed"}), log

    env_json = json.loads((out / "env.json").read_text())
    assert env_json["torch"] and env_json["nvidia_smi"]["answer"]
    assert (env_json["imports"]["deepspeed"] == "ok") == ds

    model = json.loads((out / "model.json").read_text())
    assert model["img_per_s"] > 0 and model["precision"] == "bf16" and model["model"] == "mae_vit_test"
    assert [(row["engine"], row["attn"]) for row in model["runs"]] == [
        ("torch", "sdpa"), ("torch", "math"), *([("deepspeed", "sdpa"), ("deepspeed", "math")] if ds else []),
        ("plain loop", "timm default")]
    assert all(row["img_per_s"] > 0 for row in model["runs"])

    loader = json.loads((out / "loader.json").read_text())
    assert set(loader["backends"]) == {"torchvision", "tv-decode", "turbo"} and loader["precision"] == "bf16"
    assert all(b["img_per_s"] > 0 for b in loader["backends"].values()) and loader["decode_only_img_per_s"] > 0
    assert "decode_jpeg" in loader["backends"]["tv-decode"]["measures"] and loader["images"] == 64

    teacher = json.loads((out / "teacher.json").read_text())
    assert [row["method"] for row in teacher["runs"]] == ["mae", "dmae", "d2mae", "mocov3", "dino", "simmim"]
    assert all(row["img_per_s"] > 0 for row in teacher["runs"])
    assert next(r for r in teacher["runs"] if r["method"] == "dino")["views"] == 12  # 2 global + 10 local crops

    ablation = json.loads((out / "ablation.json").read_text())
    assert len(ablation["runs"]) == 16 and ablation["ablation"]["auto"]["img_per_s"] > 0 and all(row["img_per_s"] > 0 for row in ablation["runs"])

    for name in ["e2e_torchvision"] + (["e2e_deepspeed"] if ds else []):
        e2e = json.loads((out / f"{name}.json").read_text())
        assert all(e2e[k]["img_per_s"] > 0 for k in ("loader", "model", "e2e")), name
        assert e2e["engine"] == name.removeprefix("e2e_").replace("torchvision", "torch")
        assert e2e["backend"] == "torchvision" and e2e["precision"] == "bf16"
