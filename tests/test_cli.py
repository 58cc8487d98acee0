"""The CLI as a user meets it: real subprocesses of the installed `fastvit` script."""
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import tiny_mae_overrides

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fastvit_pt.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time; t = time.perf_counter(); from click.testing import CliRunner; from fastvit_pt.cli import main; "
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = sorted(m for m in ('torch', 'timm', 'numpy', 'deepspeed', 'nvidia.dali', 'ffcv') if m in sys.modules); "
        "print(heavy, time.perf_counter() - t)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", f"--help imported {out}"
    assert time.perf_counter() - t0 < 5.0  # generous: the real figure is ~0.1 s; the import check is the point


def test_bad_input_answers_before_torch_is_imported(tmp_path):
    """A missing path, a bad key and a bad value are found from the recipe alone: the answer comes without
    loading torch (seconds on a busy machine), so it is immediate."""
    cases = [
        (["train", "recipes/demo/mae_fmnist.yaml", f"data.path={tmp_path / 'nope'}"], "data folder not found"),
        (["train", "recipes/demo/mae_fmnist.yaml", "data.backend=ffcv", f"data.path={tmp_path / 'x.beton'}"],
         "is not one; make it with: fastvit convert"),
        (["train", "recipes/demo/mae_fmnist.yaml", "optim.blrr=1"], "did you mean 'optim.blr'"),
        (["train", "recipes/demo/mae_fmnist.yaml", "train.epochs=ten"], "train.epochs: expected int"),
        (["train", "recipes/demo/mae_fmnist.yaml", "--resume", str(tmp_path / "c.pt")], "--resume: checkpoint not found"),
        (["finetune", "recipes/demo/finetune_fmnist.yaml", f"init={tmp_path / 'none.pt'}", f"data.path={tmp_path}",
          f"eval.path={tmp_path}"],
         "method.init: not found"),
        (["bench", "e2e", "recipes/demo/mae_fmnist.yaml", f"data.path={tmp_path}", f"eval.path={tmp_path / 'e'}"],
         "eval.path: not found"),
        (["analyze", "cka", str(tmp_path / "run"), "scratch", "--data", str(tmp_path)], "checkpoint not found"),
        (["analyze", "attention", "scratch", str(tmp_path / "m.pt"), "--data", str(tmp_path)], "checkpoint not found"),
    ]
    code = (
        "import json, sys; from click.testing import CliRunner; from fastvit_pt.cli import main; "
        f"cases = {[c for c, _ in cases]!r}; out = []\n"
        "for args in cases:\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    out.append((r.exit_code, r.output, 'torch' in sys.modules))\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    for (args, want), (exit_code, output, torch_loaded) in zip(cases, __import__("json").loads(res.stdout)):
        assert exit_code in (1, 2) and want in output and "Traceback" not in output, (args, output)
        assert not torch_loaded, f"{args}: torch was imported before the error"


def test_config_prints_resolved_yaml():
    r = run("config", "recipes/mae_tiny_1600ep.yaml", "optim.blr=2e-4")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["train"]["epochs"] == 1600 and cfg["optim"]["blr"] == 2e-4 and cfg["train"]["global_batch"] == 4096


def test_bad_key_is_a_usage_error_with_a_suggestion():
    r = run("config", "recipes/mae_tiny_400ep.yaml", "optim.warmup_epoch=5")
    assert r.returncode == 2
    assert "unknown config key 'optim.warmup_epoch'; did you mean 'optim.warmup_epochs'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_data_path_is_one_clear_line(tmp_path):
    r = run("train", "recipes/demo/mae_fmnist.yaml", f"data.path={tmp_path / 'missing'}", "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert f"Error: data folder not found: {tmp_path / 'missing'}" in r.stderr and "Traceback" not in r.stderr


def test_deepspeed_dry_run_shows_the_generated_config(fmnist_small, tmp_path):
    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"engine.kind": "deepspeed"})
    r = run("train", "recipes/demo/mae_fmnist.yaml", *over, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "deepspeed, ZeRO-1" in r.stdout and '"gradient_accumulation_steps": 2' in r.stdout
    assert not (tmp_path / "run").exists()


def test_dry_run_and_train_end_to_end(fmnist_small, tmp_path):
    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "run", **{"train.epochs": 1})
    r = run("train", "recipes/demo/mae_fmnist.yaml", *over, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "1000 images, 10 classes" in r.stdout and "100 global = 50 micro x 1 ranks x 2 accumulation" in r.stdout
    assert not (tmp_path / "run").exists()
    r = run("train", "recipes/demo/mae_fmnist.yaml", *over)
    assert r.returncode == 0, r.stderr
    assert "loss:" in r.stdout and "img/s" in r.stdout and "checkpoint-0001.pt" in r.stdout
    assert f"backbone (timm keys, fp32): {tmp_path / 'run' / 'model-0001.pt'}" in r.stdout
    r = run("analyze", "recon", str(tmp_path / "run"), "--data", str(fmnist_small / "test"), "-n", "4")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    im = Image.open(tmp_path / "run" / "recon.png")
    assert im.size == (4 * 28 * 9, 4 * 28 * 9)  # 4 columns x 4 rows of 28 px, scaled 9x
    # the analyses of the same run: CKA against a random init and itself, attention, the report's curves
    test = str(fmnist_small / "test")
    r = run("analyze", "cka", str(tmp_path / "run"), "scratch", "--data", test, "--images", "96", "--batch", "32",
            "--out", str(tmp_path / "cka.png"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "cka.json").read_text())
    assert res["images"] == 96 and len(res["cka"]) == 3 and len(res["cka"][0]) == 3  # 2 blocks: 0..2
    assert res["label_a"] == "run" and res["label_b"] == "random init" and "diagonal:" in r.stdout
    _assert_png(tmp_path / "cka.png")
    r = run("analyze", "cka", str(tmp_path / "run"), "--data", test, "--images", "64", "--batch", "32",
            "--out", str(tmp_path / "self.png"))
    assert r.returncode == 0, r.stderr
    same = json.loads((tmp_path / "self.json").read_text())["cka"]
    assert all(abs(same[i][i] - 1) < 1e-6 for i in range(3))
    r = run("analyze", "attention", str(tmp_path / "run"), "scratch", "--data", test, "--images", "64",
            "--out", str(tmp_path / "attn.png"), "--labels", "trained,random")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "attn.json").read_text())
    assert [m["label"] for m in res["models"]] == ["trained", "random"] and res["images"] == 64
    assert all(len(m["distance_px"]) == 2 and len(m["entropy"][0]) == 2 for m in res["models"])  # 2 blocks x 2 heads
    _assert_png(tmp_path / "attn.png")
    r = run("report", str(tmp_path / "run"), "--plot", str(tmp_path / "curves.png"))
    assert r.returncode == 0, r.stderr
    _assert_png(tmp_path / "curves.png")


def _assert_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_bench_model_times_both_engines_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = run("bench", "model", "--model", "mae_vit_test", "--img-size", "32", "--batch", "4", "--steps", "2",
            "--warmup", "1", "--precision", "fp32", "--timm-ref", "none", "--engine", "torch,deepspeed",
            "--json", str(out), "--plot", str(tmp_path / "model.png"))
    assert r.returncode == 0, r.stderr
    _assert_png(tmp_path / "model.png")
    import json

    res = json.loads(out.read_text())
    assert res["model"] == "mae_vit_test" and res["batch"] == 4 and res["img_per_s"] > 0
    assert [(row["engine"], row["attn"]) for row in res["runs"]] == [
        ("torch", "sdpa"), ("torch", "math"), ("deepspeed", "sdpa"), ("deepspeed", "math")]
    assert all(0 < row["mfu"] < 1 for row in res["runs"]) and res["train_gflops_per_image"] > 0
    assert res["runs"][0]["ratio_vs_first"] == 1.0
    assert "math" in r.stdout and "deepspeed" in r.stdout and "MFU" in r.stdout


def test_bench_e2e_reports_loader_model_and_end_to_end(fmnist_small, tmp_path):
    out = tmp_path / "e2e.json"
    over = tiny_mae_overrides(fmnist_small / "train", tmp_path / "run")
    r = run("bench", "e2e", "recipes/demo/mae_fmnist.yaml", *over, "--steps", "3", "--warmup", "1", "--windows", "2",
            "--json", str(out), "--plot", str(tmp_path / "e2e.png"))
    assert r.returncode == 0, r.stderr
    _assert_png(tmp_path / "e2e.png")
    import json

    res = json.loads(out.read_text())
    assert {"loader", "model", "e2e"} <= set(res) and res["backend"] == "torchvision"
    assert all(len(res[k]["windows_img_per_s"]) == 2 and res[k]["img_per_s"] > 0 for k in ("loader", "model", "e2e"))
    assert 0 < res["e2e"]["mfu"] <= res["model"]["mfu"] * 1.5
    assert "end-to-end" in r.stdout and not (tmp_path / "run").exists()  # a benchmark writes no run


def test_bench_loader_writes_json(photo_tree, tmp_path):
    out = tmp_path / "loader.json"
    r = run("bench", "loader", "--data", str(photo_tree), "--backends", "torchvision,dali", "--workers", "2",
            "--batch", "8", "--img-size", "64", "--epochs", "1", "--json", str(out), "--plot", str(tmp_path / "l.png"))
    assert r.returncode == 0, r.stderr
    _assert_png(tmp_path / "l.png")
    import json

    res = json.loads(out.read_text())
    assert set(res["backends"]) == {"torchvision", "dali"} and res["images"] == 48
    assert res["backends"]["torchvision"]["ratio_vs_torchvision"] == 1.0
    assert all(b["img_per_s"] > 0 for b in res["backends"].values()) and res["decode_only_img_per_s"] > 0
    assert "dali" in r.stdout and "decode only" in r.stdout


def test_progress_in_a_log_is_plain_lines(fmnist_small, tmp_path):
    """stderr is a pipe here, as in CI or `make demo | tee`: no carriage returns or cursor escapes (FFCV's own
    writer bar included), one line per stage at least, and the summary on stdout."""
    r = run("convert", str(fmnist_small / "train"), str(tmp_path / "f.beton"), "--mode", "raw", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr
    lines = r.stderr.splitlines()
    assert any(ln.startswith("prepare: 1000/1000 img (100%)") for ln in lines), r.stderr
    assert any(ln.startswith("write: 1000/1000 img (100%)") for ln in lines), r.stderr
    assert "wrote " in r.stdout and "1000 images in 10 classes" in r.stdout
