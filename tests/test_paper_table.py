"""benchmarks/paper_table.py, the generator of benchmarks/results/paper_table_fmnist.md, on a runs tree written here
with known numbers: every figure it prints must be the one the runs hold, and every verdict must follow them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ("mae", "mocov3", "dino", "simmim", "dmae", "d2mae")


def write_run(run: Path, model: str, losses, rate: float, evals=()):
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  name: {model}\n  img_size: 28\n  patch_size: 7\n"
                                     "train:\n  global_batch: 128\n  epochs: 1\nengine:\n  precision: fp32\n")
    rows = [{"step": 10 * (k + 1), "epoch": 0.1 * (k + 1), "img_per_s": rate, "loss": x} for k, x in enumerate(losses)]
    rows += [{"step": 100, "eval_epoch": e, "eval_top1": t} for e, t in evals]  # as the loop writes them
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_tree(out: Path, ft2_mae: float, fine_over=None, dino_losses=(1.0, 0.5), entropy=1.0):
    fine = {"mae": 80.0, "mocov3": 75.0, "dino": 74.0, "simmim": 79.0, "dmae": 81.0, "d2mae": 79.5, "scratch": 70.0,
            **(fine_over or {})}
    probe = {"mae": 70.0, "mocov3": 74.0, "dino": 72.0, "simmim": 65.0, "dmae": 71.0, "d2mae": 69.0,
             "scratch": 60.0, "teacher": 76.0}
    times = []
    for m in STUDENTS + ("teacher",):
        model = "mae_vit_small_patch16" if m == "teacher" else "mae_vit_tiny_patch16"
        write_run(out / m, model, dino_losses if m == "dino" else [1.0, 0.5], 100.0 + len(m))
        times.append(f"60.0 100.0 20.0\tfastvit train x.yaml --out {out / m} --resume")
    for init in STUDENTS + ("scratch",):
        for s, jitter in zip("012", (-0.5, 0.0, 0.5)):
            write_run(out / f"ft_{init}_s{s}", "vit_tiny_patch16", [2.0], 90.0, [(3, fine[init] + jitter)])
            (out / f"linprobe_{init}_s{s}.json").write_text(json.dumps({"top1": probe[init] + jitter / 5}))
        (out / f"knn_{init}_s0.json").write_text(json.dumps({"top1": probe[init] - 3}))
    for s in "012":
        (out / f"linprobe_teacher_s{s}.json").write_text(json.dumps({"top1": probe["teacher"]}))
    (out / "knn_teacher_s0.json").write_text(json.dumps({"top1": probe["teacher"] - 1}))
    write_run(out / "ft2x_mae_s0", "vit_tiny_patch16", [2.0], 90.0, [(6, ft2_mae)])
    write_run(out / "ftlen1_mae_s0", "vit_tiny_patch16", [2.0], 90.0, [(1, 75.0)])  # a shorter length: the curve
    # CKA: MAE-Tiny close to the teacher low, far high; the distilled students closer high
    def cka(high):
        return [[1.0 if i == j and i < 5 else (high if i == j else 0.1) for j in range(13)] for i in range(13)]
    for m, high in (("mae", 0.3), ("dmae", 0.6), ("d2mae", 0.5)):
        (out / f"cka_{m}_vs_teacher.json").write_text(json.dumps({"cka": cka(high)}))
    # attention: one JSON per encoder (made in its column), one with several (made at once): both are read
    att = [{"checkpoint": str(out / m), "label": m, "distance_px": [[d] * 3 for d in [5.0] * 8 + [dist] * 4],
            "entropy": [[entropy] * 3] * 12} for m, dist in (("mae", 4.0), ("mocov3", 9.0), ("dino", 8.0))]
    (out / "attention.json").write_text(json.dumps({"models": att[1:]}))
    (out / "attention_mae.json").write_text(json.dumps({"models": att[:1]}))
    (out / "commands.txt").write_text("fastvit train x.yaml\n")
    times.append("30.0 50.0 10.0\tfastvit knn")
    (out / "times.tsv").write_text("\n".join(times) + "\n")


def generate(tmp_path, ft2_mae, **tree):
    out, res = tmp_path / "runs", tmp_path / "res"
    res.mkdir()
    make_tree(out, ft2_mae, **tree)
    r = subprocess.run([sys.executable, "benchmarks/paper_table.py", str(out), "--res", str(res),
                        "--note", "two streams of one thread"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, res


def test_table_figures_and_verdicts_follow_the_runs(tmp_path):
    md, res = generate(tmp_path, ft2_mae=79.8)
    # rows: mean ± sample std over the 3 seeds, the MAE difference, the pre-training rate and image count
    # (each fine-tune scored once: one fine-tune column)
    assert "| MAE | 80.00 ± 0.50 | 70.00 ± 0.10 | 67.00 |  | 103 | 1:00 | 2,560 |" in md
    assert "| D-MAE | 81.00 ± 0.50 | 71.00 ± 0.10 | 68.00 | +1.00 |" in md and "(best eval)" not in md
    assert "| scratch | 70.00 ± 0.50 |" in md and "57.00 ± 0.00" not in md
    # the teacher beats the student: +6 linear probe, +5 k-NN
    assert "linear probe 76.00 vs 70.00 (**+6.00**), k-NN 75.00 vs 67.00 (**+8.00**)" in md
    assert "A clear margin" in md
    # the doubling moved MAE by +0.30 < its 0.50 seed spread
    assert "moves top-1 by +0.30 (seed 0: 79.50 -> 79.80)" in md and "converged by the issue's test" in md
    # the fine-tune's length: seed 0 of MAE at 1, 3 (the table's) and 6 epochs (the check's), each its own run
    assert "| init (seed) | 1 ep | 3 ep | 6 ep |" in md and "| MAE (0) | 75.00 | 79.50 (+4.50) | 79.80 (+0.30) |" in md
    assert (res / "paper_ft_length_fmnist.png").stat().st_size > 1000 and "| scratch (0)" not in md
    # observations: MAE-style best fine-tune, contrastive better probe, distillation (D-MAE +1, D²-MAE -0.5)
    assert ("The best is D-MAE: plain masked-image modelling (MAE) beats the best contrastive method (MoCo-v3): "
            "**supports** the first half") in md and "below the random init" not in md
    assert "MoCo-v3 74.00 vs MAE 70.00 (+4.00); DINO 72.00 vs MAE 70.00 (+2.00): **supports** the second half" in md
    assert "D²-MAE 79.50 vs MAE 80.00 (-0.50, within the seed spread)" in md and "**partly supports** it." in md
    assert "blocks 1-4 CKA 1.00, blocks 8-11 0.30: **supports** the first half" in md
    assert "D-MAE 0.60 (+0.30); D²-MAE 0.50 (+0.20): **supports** the second half" in md
    assert "MAE 4.00 / 1.00; MoCo-v3 9.00 / 1.00; DINO 8.00 / 1.00: **supports** it." in md
    # totals: 7 pre-trainings of 60 s + one 30-s command; CPU 7 x 120 + 60 s
    assert "- Total: 7:30 wall, 0.25 CPU-hours" in md and "\n- two streams of one thread\n" in md
    assert (res / "paper_cka_fmnist.png").stat().st_size > 1000
    assert (res / "paper_attention_fmnist.png").stat().st_size > 1000


def test_unconverged_fine_tune_and_contradictions_are_reported(tmp_path):
    md, _ = generate(tmp_path, ft2_mae=72.0, fine_over={"mae": 69.0, "simmim": 72.0}, dino_losses=(8.2, 8.25),
                     entropy=2.7)
    assert "moves top-1 by +3.50 (seed 0: 68.50 -> 72.00)" in md and "**not converged**" in md
    # MAE below MoCo-v3 and below scratch: only the distilled students carry the first half
    assert ("The best is D-MAE, a distilled MAE; without the teacher MoCo-v3 beats plain masked-image modelling "
            "(best: SimMIM): **partly supports**") in md
    assert "MAE is below the random init (69.00 vs 70.00)" in md
    assert "**Pre-training loss did not fall**: DINO (8.2000 -> 8.2500)" in md
    # attention at log 16 = 2.77 nats is uniform: no locality to compare, whatever the distances say
    assert "MoCo-v3 9.00 / 2.70; DINO 8.00 / 2.70: **inconclusive**: every one of them attends almost uniformly" in md


def test_missing_runs_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/paper_table.py", str(tmp_path / "nope")], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "holds no runs of benchmarks/paper_table.sh" in r.stderr and not r.stdout


# ------------------------------------------------------------------------------- benchmarks/paper_table.sh, sittings
def sitting(data: Path, out: Path, rec: Path, **env_extra):
    """One invocation of the script on a new checkout's terms: OUT is whatever this sitting has on disk, REC the
    committed record. MAE-Tiny pre-trained 4 steps on 200 images, fine-tuned 1 epoch: real runs, seconds long."""
    exe = Path(sys.executable).parent
    env = {**os.environ, "OUT": str(out), "REC": str(rec), "RES": str(rec.parent), "TRAIN": str(data / "train"),
           "TEST": str(data / "test"), "PT_DATA": str(data / "train"),
           "PT_ARGS": "engine.precision=fp32 train.global_batch=50 train.micro_batch=50 train.tensorboard=false",
           "FT_ARGS": "engine.precision=fp32 train.tensorboard=false", "METHODS": "mae", "SCRATCH": "0",
           "SEEDS": "0", "FT_EPOCHS": "1", "CHECK_INITS": "", "CURVE_EPOCHS": "", "TABLE": "0",
           "OMP_NUM_THREADS": "1", "FASTVIT": str(exe / "fastvit"), "PYTHON": sys.executable, **env_extra}
    return subprocess.run(["bash", "benchmarks/paper_table.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def test_sittings_record_restore_and_check_remade_weights(fmnist_small, tmp_path):
    out, rec, data = tmp_path / "runs", tmp_path / "results" / "paper_fmnist", tmp_path / "data"
    for split in ("train", "test"):  # 20 images of each class
        for cls in sorted((fmnist_small / split).iterdir()):
            (data / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:20]:
                (data / split / cls.name / f.name).symlink_to(f)
    # sitting 1: the MAE column, seed 0; its small files go into the record, its weights do not
    r = sitting(data, out, rec)
    assert r.returncode == 0, r.stderr[-3000:]
    mark = json.loads((rec / "mae" / "finished.json").read_text())
    assert len(mark["weights"]) == 64 and mark["epochs"] == 1
    for f in ("mae/metrics.jsonl", "ft_mae_s0/finished.json", "ft_mae_s0/metrics.jsonl", "linprobe_mae_s0.json",
              "knn_mae_s0.json", "attention_mae.json", "times.tsv", "commands.txt"):
        assert (rec / f).is_file(), f
    assert not list(rec.rglob("*.pt")) and (out / "mae" / "model-0001.pt").is_file()
    assert not list(rec.glob("ft2x_*")), "CHECK_INITS='' must mean no convergence checks"

    # sitting 2, a new checkout (no runs/): seed 1 needs MAE's weights, pre-trained again: the same digest, so the
    # recorded run stands and seed 0 is not run again
    shutil.rmtree(out)
    r = sitting(data, out, rec, SEEDS="0 1", TABLE="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((rec / "mae" / "finished.json").read_text()) == mark
    assert len((rec / "times_remade.tsv").read_text().splitlines()) == 1
    finetunes = [ln for ln in (rec / "times.tsv").read_text().splitlines() if " finetune " in ln]
    assert len(finetunes) == 2 and (rec / "linprobe_mae_s1.json").is_file()
    assert not (rec / "knn_mae_s1.json").exists()  # k-NN of a pre-trained encoder: once
    assert "pre-trained again" in (rec / "commands.txt").read_text()
    md = (rec.parent / "paper_table_fmnist.md").read_text()
    assert "| MAE | " in md and "1 pre-trainings made again" in md

    # sitting 3: the recorded weights are not the ones this machine makes (another CPU kind): it stops and says so
    shutil.rmtree(out)
    (rec / "mae" / "finished.json").write_text(json.dumps({**mark, "weights": "0" * 64}))
    r = sitting(data, out, rec, SEEDS="0 1 2")
    assert r.returncode == 1 and "gave other weights than the ones its recorded evaluations came from" in r.stderr
    assert 'REDO="mae"' in r.stderr and not (rec / "ft_mae_s2").exists()

    # REDO sets the method's recorded runs aside, to be made again
    r = sitting(data, out, rec, REDO="mae", METHODS="")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (rec / "mae").exists() and not (rec / "linprobe_mae_s0.json").exists()
    (moved,) = (rec / "superseded").iterdir()
    assert (moved / "mae" / "finished.json").is_file() and (moved / "ft_mae_s1" / "finished.json").is_file()


def test_runs_from_sittings_on_other_cpus_and_another_teacher_are_reported(tmp_path):
    out, res = tmp_path / "runs", tmp_path / "res"
    res.mkdir()
    make_tree(out, 79.8)
    for run, cpu, extra in (("mae", "AMD EPYC (avx2)", {}), ("teacher", "Intel(R) Xeon(R) (avx512_bf16)", {}),
                            ("dmae", "Intel(R) Xeon(R) (avx512_bf16)", {"teacher": "b" * 64})):
        (out / run / "finished.json").write_text(json.dumps({"epochs": 1, "cpu": cpu, "weights": "a" * 64, **extra}))
    r = subprocess.run([sys.executable, "benchmarks/paper_table.py", str(out), "--res", str(res)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "- Machines (the runs' finished.json; sittings on different CPUs): Intel(R) Xeon(R) (avx512_bf16): 2 runs; " \
           "AMD EPYC (avx2): 1 run;" in r.stdout
    assert "**D-MAE distilled another teacher** than the one in the table (weights sha256 bbbbbbbbbbbb against " \
           "aaaaaaaaaaaa)" in r.stdout and "D²-MAE distilled" not in r.stdout
    assert "| AMD EPYC (avx2) |" in r.stdout  # the pre-training table: the CPU of each run


def test_mae_level_with_scratch_within_the_seed_spread(tmp_path):
    md, _ = generate(tmp_path, ft2_mae=79.8, fine_over={"scratch": 80.3})
    assert "MAE is level with the random init (80.00 vs 80.30, within the seed spread of 0.50)" in md
    assert "below the random init" not in md
