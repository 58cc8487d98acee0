"""`fastvit`: each command loads a recipe (+ dotted KEY=VALUE overrides) and calls one library function.

Imports here stay light (click, and yaml through config): torch and friends load inside the commands,
so `fastvit --help` answers at once.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import click


class _UserErrors(click.Group):
    """Turn the library's user-facing errors into one clear line instead of a traceback
    (FASTVIT_DEBUG=1 keeps the traceback)."""

    def invoke(self, ctx):
        import os

        from .config import ConfigError

        try:
            return super().invoke(ctx)
        except ConfigError as err:
            if os.environ.get("FASTVIT_DEBUG"):
                raise
            raise click.UsageError(str(err), ctx) from None
        except Exception as err:
            if os.environ.get("FASTVIT_DEBUG") or not _is_user_error(err):
                raise
            raise click.ClickException(_first_line_of_worker_error(str(err))) from None


# errors the library raises for bad input, as (module, class): looked up only in modules already imported, so a
# bad path found before torch loads is reported without loading it (an error of a module never imported cannot occur)
_USER_ERRORS = (("pipelines.base", "DecodeError"), ("fastvit_pt.engine.checkpoint", "CheckpointError"),
                ("fastvit_pt.engine.loop", "NonFiniteLossError"), ("fastvit_pt.engine.loop", "RankLostError"))


def _is_user_error(err: Exception) -> bool:
    if isinstance(err, (FileNotFoundError, FileExistsError, ValueError, ImportError)):
        return True
    loaded = (getattr(sys.modules.get(mod), name, None) for mod, name in _USER_ERRORS)
    return isinstance(err, tuple(cls for cls in loaded if cls is not None))


def _first_line_of_worker_error(msg: str) -> str:
    """A DataLoader worker's error arrives wrapped with its traceback; the user needs its last line."""
    if "Original Traceback" in msg:
        lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
        return lines[-1].split(": ", 1)[-1] if lines else msg
    return msg


def _write_json(res: dict, json_path: Optional[str]) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
        click.echo(f"wrote {json_path}")


def _load(recipe: str, overrides: List[str], out: Optional[str] = None):
    from .config import load_config

    # `init=PATH` is short for method.init=PATH
    overrides = [f"method.{o}" if o.startswith("init=") else o for o in overrides]
    return load_config(recipe, overrides + ([f"train.out_dir={out}"] if out else []))


def _write_plot(kind: str, res: dict, png: Optional[str]) -> None:
    if png:
        from .analysis.plots import bench_plot

        click.echo(f"wrote {bench_plot(kind, res, png)}")


@click.group(cls=_UserErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fastvit_pt")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Passed by the deepspeed launcher; the rank is read from LOCAL_RANK in the environment.")
def main(local_rank: Optional[int]) -> None:
    """Self-supervised pre-training of lightweight ViTs (MAE-lite), as fast as the hardware allows."""


def _run_options(f):
    """RECIPE, KEY=VALUE overrides, --resume, --out, --dry-run: what train and finetune share."""
    for deco in reversed([
        click.argument("recipe", type=click.Path(dir_okay=False)),
        click.argument("overrides", nargs=-1),
        click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[PATH]",
                     help="Resume from PATH, or alone: the latest checkpoint in the run directory."),
        click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (train.out_dir)."),
        click.option("--dry-run", is_flag=True, help="Resolve and build everything, print the plan, train nothing."),
    ]):
        f = deco(f)
    return f


@main.command(context_settings={"ignore_unknown_options": False})
@_run_options
def train(recipe: str, overrides: List[str], resume: Optional[str], out: Optional[str], dry_run: bool) -> None:
    """Pre-train (or fine-tune) with RECIPE; KEY=VALUE pairs override it (optim.blr=1e-4 train.epochs=10)."""
    _run(_load(recipe, overrides, out), resume, dry_run)


@main.command(context_settings={"ignore_unknown_options": False})
@_run_options
def finetune(recipe: str, overrides: List[str], resume: Optional[str], out: Optional[str], dry_run: bool) -> None:
    """Fine-tune a pre-trained backbone with RECIPE (method.name: finetune): init=CHECKPOINT (any layout
    `fastvit knn` reads, or init=scratch) and KEY=VALUE overrides. Evaluates on eval.path every
    eval.every_epochs and keeps the best weights as model-best.pt."""
    from .config import ConfigError

    cfg = _load(recipe, [o for o in overrides if o.startswith("method.name=")], out)  # the recipe's method first
    if cfg.method.classifies:
        cfg = _load(recipe, overrides, out)
    if not cfg.method.classifies:
        raise ConfigError(f"{recipe} trains method {cfg.method.name!r}; fastvit finetune needs a fine-tuning recipe "
                          "(method.name: finetune, e.g. recipes/finetune_tiny_300ep.yaml). Pre-train with fastvit train.")
    _run(cfg, resume, dry_run)


def _run(cfg, resume: Optional[str], dry_run: bool) -> None:
    # every path the run reads must exist: a typo answers here, before torch is imported
    if resume not in (None, "latest") and not Path(resume).exists():
        raise FileNotFoundError(f"--resume: checkpoint not found: {resume}")
    cfg.check_paths()
    if dry_run:
        from .engine.plan import describe_plan

        click.echo(describe_plan(cfg))
        return
    from .engine.loop import NonFiniteLossError, train as run_training

    t0 = time.perf_counter()
    try:
        res = run_training(cfg, resume)
    except NonFiniteLossError as err:
        raise click.ClickException(str(err)) from None
    from .engine.metrics import summarize_run

    if not res.is_main:
        return
    done = summarize_run(res.run_dir)
    if res.epochs_run == 0:
        click.echo(f"nothing to do: {res.run_dir} has already trained all {cfg.train.epochs} epochs")
    else:
        click.echo(f"trained {res.epochs_run} epoch(s) in {time.perf_counter() - t0:.0f} s")
    if done:
        click.echo(
            f"run so far: {done['epochs']:.0f}/{cfg.train.epochs} epochs, {done['steps']} optimizer steps\n"
            f"loss: {done['first_loss']:.4f} (first log) -> {done['last_loss']:.4f} (last log)\n"
            f"throughput: {done['img_per_s']:.0f} img/s (median over log intervals)"
        )
    click.echo(f"checkpoint: {res.checkpoint}")
    if res.checkpoint is not None:
        from .engine.checkpoint import exported_model

        model = exported_model(res.checkpoint)
        if model.is_file():
            click.echo(f"backbone (timm keys, fp32): {model}")
    if res.best is not None:
        from .engine.evaluate import BEST_MODEL

        b = res.best
        click.echo(f"eval: best top-1 {b['top1']:.2f}% (top-5 {b['top5']:.2f}%) at epoch {b['epoch']} on "
                   f"{b['images']} images; its weights: {res.run_dir / BEST_MODEL}")
    click.echo(f"metrics: {res.run_dir / 'metrics.jsonl'}  config: {res.run_dir / 'config.yaml'}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--launcher", type=click.Choice(["torchrun", "deepspeed"]), default="torchrun", show_default=True)
@click.option("--nproc-per-node", type=int, default=None, help="Ranks per node [default: GPUs here, or 1].")
@click.option("--nnodes", type=int, default=1, show_default=True)
@click.option("--node-rank", type=int, default=None, help="torchrun: this node's rank (optional with c10d rendezvous).")
@click.option("--master-addr", default=None, help="Host of node 0 (torchrun rendezvous endpoint).")
@click.option("--master-port", type=int, default=29500, show_default=True)
@click.option("--hostfile", default=None, help="deepspeed launcher: MPI-style hostfile ('host slots=8' lines).")
@click.option("--print-only", is_flag=True, help="Print the launcher command and exit.")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED, required=True)
def launch(launcher, nproc_per_node, nnodes, node_rank, master_addr, master_port, hostfile, print_only, train_args):
    """Run `fastvit train TRAIN_ARGS` under torchrun or the deepspeed launcher: builds their command line,
    prints it, and execs it (they do all process management)."""
    import os
    import shlex

    from .distributed.launch import launch_command

    if nproc_per_node is None:
        import torch

        nproc_per_node = max(1, torch.cuda.device_count())
    cmd = launch_command(train_args, launcher, nproc_per_node, nnodes, node_rank, master_addr, master_port, hostfile)
    click.echo(shlex.join(cmd), err=not print_only)
    if not print_only:
        sys.stdout.flush()
        os.execvp(cmd[0], cmd)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def config(recipe: str, overrides: List[str]) -> None:
    """Print RECIPE fully resolved (defaults < recipe < KEY=VALUE overrides) as YAML."""
    from .config import to_yaml

    click.echo(to_yaml(_load(recipe, overrides)), nl=False)


@main.command()
def models() -> None:
    """List the registered models and methods."""
    from .methods import list_methods
    from .models import list_models

    click.echo("models:  " + " ".join(list_models()))
    click.echo("methods: " + " ".join(list_methods()))


@main.group()
def data() -> None:
    """Materialise data sets."""


@data.command("fashion-mnist")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--source", default="/usr/share/datasets/fashion-mnist", show_default=True,
              help="Folder with the IDX .gz files of the Debian package dataset-fashion-mnist.")
@click.option("--per-class", type=int, default=None, help="Keep only the first N images of each class per split.")
def data_fashion_mnist(out_dir: str, source: str, per_class: Optional[int]) -> None:
    """Write Fashion-MNIST as OUT_DIR/{train,test}/<class>/<n>.png (an ImageFolder tree)."""
    from pipelines.fashion_mnist import write_fashion_mnist

    from .engine.metrics import Progress

    total = 70_000 if per_class is None else 20 * per_class
    with Progress(True, total, "fashion-mnist", unit="img", interval=5.0) as bar:
        counts = write_fashion_mnist(out_dir, source, per_class, progress=bar.update)
    for split, class_counts in counts.items():
        click.echo(f"{Path(out_dir) / split}: {sum(class_counts.values())} images in {len(class_counts)} classes")


@data.command("photos")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n", "n", type=int, default=None,
              help="Images to write [default: each source photograph once]; past the sources, random crops of them.")
@click.option("--max-side", type=int, default=500, show_default=True,
              help="Long side of the derived crops, and the cap on the originals' (ImageNet's JPEGs: ~500 px).")
@click.option("--classes", type=int, default=10, show_default=True, help="Class folders (image i in class i mod K).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--source", "sources", multiple=True, type=click.Path(exists=True, file_okay=False), envvar="FASTVIT_PHOTOS",
              help="Also use the .jpg/.png photographs in this folder (repeatable; FASTVIT_PHOTOS=DIR[:DIR] too).")
@click.option("--workers", default=0, show_default=True, help="Encoding processes (0 = every core).")
def data_photos(out_dir: str, n: Optional[int], max_side: int, classes: int, seed: int, sources, workers: int) -> None:
    """Write an ImageNet-like class-folder tree of real photographs, OUT_DIR/<class>/img_NNNNNN.JPEG, from the
    sample photographs that scikit-image, scikit-learn and matplotlib ship (read offline from their installed
    files), plus any --source folder. Baseline 4:2:0 JPEGs at quality 90-95; deterministic in --seed."""
    from pipelines.photos import MANIFEST, PhotoSettings, find_sources, write_photos

    from .engine.metrics import Progress

    settings = PhotoSettings(n=n, max_side=max_side, classes=classes, seed=seed)
    settings.validate()
    found = find_sources(sources)
    total = n or len(found)
    t0 = time.perf_counter()
    with Progress(True, total, "photos", unit="img", interval=5.0) as bar:
        m = write_photos(out_dir, settings, found, workers, progress=lambda done, _: bar.update(done - bar.n))
    origins = sorted({x["origin"].split(":")[0] for x in m["sources"]})
    click.echo(f"wrote {m['images']} images in {m['classes']} classes to {out_dir} in {time.perf_counter() - t0:.1f} s: "
               f"{m['originals']} source photographs as they are (long side <= {max_side} px) and {m['derived']} random "
               f"crops of them at {max_side} px; mean {m['mean_kb']} KB; sources: {', '.join(origins)}; "
               f"manifest {Path(out_dir) / MANIFEST}")


@main.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--max-res", type=int, default=None, help="Longest side in pixels; larger images are resized.")
@click.option("--quality", default=90, show_default=True, help="JPEG quality for images that are (re-)encoded.")
@click.option("--mode", type=click.Choice(["jpg", "raw", "smart"]), default="jpg", show_default=True,
              help="jpg: JPEG (baseline RGB JPEGs within --max-res keep their bytes); raw: pixels; smart: raw when small.")
@click.option("--workers", default=0, show_default=True, help="Preparing processes (0 = every core).")
@click.option("--limit", type=int, default=None, help="Convert only N files, spread evenly over all classes.")
@click.option("--strict", is_flag=True, help="Fail (and leave no .beton) if any file has to be skipped.")
def convert(src, out, max_res, quality, mode, workers, limit, strict):
    """Convert a class-folder tree SRC (ImageNet layout) to an FFCV .beton OUT, with a manifest OUT.json."""
    from pipelines.beton import ConversionError, ConvertSettings, convert as run_convert, manifest_path

    from .engine.metrics import Progress

    settings = ConvertSettings(max_res=max_res, quality=quality, mode=mode, workers=workers, limit=limit, strict=strict)
    bar = None

    def progress(stage, done, total):  # one bar per stage (prepare, then write), one after the other
        nonlocal bar
        if bar is None or bar.desc != stage:
            if bar is not None:
                bar.close()
            bar = Progress(True, total, stage, unit="img", interval=5.0)
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    try:
        m = run_convert(src, out, settings, progress)
    except ConversionError as err:
        raise click.ClickException(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    for x in m["skipped"]:
        click.echo(f"skipped {x['path']}: {x['reason']}", err=True)
    st = m["stored"]
    click.echo(f"wrote {out}: {m['num_samples']} images in {len(m['classes'])} classes in {time.perf_counter() - t0:.1f} s "
               f"({st['passthrough']} original JPEG bytes, {st['jpg']} re-encoded, {st['raw']} raw); "
               f"{len(m['skipped'])} skipped; manifest {manifest_path(out)}")


@main.group()
def bench() -> None:
    """Throughput benchmarks (warm-up, then medians; all cases side by side in one run)."""


@bench.command("model")
@click.option("--model", default="mae_vit_tiny_patch16", show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--img-size", default=224, show_default=True)
@click.option("--patch-size", default=16, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA and native-bf16 CPUs, else fp32.")
@click.option("--attn", default="sdpa,math", show_default=True, help="Attention implementations to compare.")
@click.option("--steps", default=10, show_default=True, help="Timed steps (the median is reported).")
@click.option("--warmup", default=3, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--timm-ref", default="vit_tiny_patch16_224", show_default=True,
              help="timm model timed beside ours (full tokens, 12 heads); 'none' to skip.")
@click.option("--engine", "engines", default="torch", show_default=True,
              help="Engines to time side by side: torch, deepspeed, or torch,deepspeed.")
@click.option("--ablate", is_flag=True, help="The step-policy ablation instead: SDPA, fused AdamW, bf16 autocast and "
              "torch.compile all off, each on alone, all on, then the other combinations (16; first --engine only), "
              "with the fastest, today's default and what `auto` picks.")
@click.option("--policy", is_flag=True, help="The step `auto` resolves to for a long run (measured through the "
              "policy itself, or from its cache), beside the default before it measured (first --method only).")
@click.option("--method", "methods", default="mae", show_default=True,
              help="Methods to time side by side (`fastvit models`), e.g. mae,dmae,d2mae,mocov3; 'vs 1st' is each "
              "against the first method with the same engine and attention.")
@click.option("--teacher", default=None, help="Frozen teacher encoder of the methods that distil one (e.g. "
              "vit_base_patch16; random weights) [default: their method.teacher_model].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), default=None, help="Also draw the results as bars (PNG).")
@click.argument("method_settings", nargs=-1)
def bench_model_cmd(model, batch, img_size, patch_size, precision, attn, steps, warmup, device, timm_ref, engines,
                    ablate, policy, methods, teacher, json_path, plot_png, method_settings):
    """Model-only train-step img/s (the engine's forward + backward + AdamW step) on a synthetic batch, with MFU.
    METHOD_SETTINGS (decoder_block=1 mlp_dim=1024) apply to the methods whose section has them."""
    from .bench import ABLATION, bench_model, policy_cases
    from .engine.metrics import Progress

    impls = [a.strip() for a in attn.split(",") if a.strip()]
    kinds = [e.strip() for e in engines.split(",") if e.strip()]
    bad = [k for k in kinds if k not in ("torch", "deepspeed")]
    if bad:
        raise click.UsageError(f"--engine: expected torch and/or deepspeed, got {', '.join(bad)}")
    ref = None if timm_ref.lower() == "none" else timm_ref
    from .methods.configs import method_names

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in method_names()]
    if unknown or not names:
        raise click.UsageError(f"--method: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(method_names())}")
    from .config import parse_overrides

    settings = parse_overrides(list(method_settings))
    variants, chosen = (ABLATION, None) if ablate else ((), None)
    if policy:
        fields = {"teacher": "random", "teacher_model": teacher, **settings}
        variants, chosen = policy_cases(model, batch, img_size, patch_size, names[0], device, fields)
        click.echo("\n".join(chosen.describe()))
    cases = len(variants) if variants else len(impls) * len(kinds) * len(names)
    with Progress(True, steps * (cases + (ref is not None)), "bench model", unit="step") as bar:
        res = bench_model(model, batch, img_size, patch_size, precision, impls, steps, warmup, device,
                          timm_reference=ref, progress=bar.update, engines=kinds, variants=variants,
                          teacher=teacher, methods=names, method_settings=settings)
    click.echo(f"{res['env']['device']}, torch {res['env']['torch']}, {res['precision']}, batch {batch}, {img_size} px; "
               f"{res['train_gflops_per_image']} GFLOP per image per train step; peak {res['peak']['tflops']} TFLOP/s "
               f"({res['peak']['source']})")
    click.echo(f"{'case':46s} {'engine':>10s} {'attn':>12s} {'img/s':>9s} {'ms/step':>9s} {'MFU':>7s} {'vs 1st':>7s} "
               f"{'vs timm':>8s}")
    for r in res["runs"]:
        ratio = f"{r['ratio_vs_timm']:.2f}x" if r["ratio_vs_timm"] else "-"
        first = f"{r['ratio_vs_first']:.2f}x" if r.get("ratio_vs_first") else "-"
        util = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        click.echo(f"{r['name']:46s} {r['engine']:>10s} {r['attn']:>12s} {r['img_per_s']:9.1f} {r['step_ms_median']:9.1f} "
                   f"{util:>7s} {first:>7s} {ratio:>8s}")
    for what, s in (res.get("ablation") or {}).items():
        title = {"best": "fastest", "default": "default before auto measured", "auto": "auto picks (a long run)"}[what]
        click.echo(f"{title:30s} {s['case']:36s} {s['img_per_s']:8.1f} img/s  {s['vs_none']:.2f}x none  "
                   f"{s['vs_default']:.2f}x default")
    if chosen is not None:
        res["policy"] = {"lines": chosen.describe(), "rates": chosen.rates}
    _write_json(res, json_path)
    _write_plot("model", res, plot_png)


@bench.command("e2e")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--steps", default=20, show_default=True, help="Steps per timed window.")
@click.option("--warmup", default=5, show_default=True, help="Untimed steps before each measurement.")
@click.option("--windows", default=3, show_default=True, help="Timed windows (the median is reported).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), default=None, help="Also draw the results as bars (PNG).")
def bench_e2e_cmd(recipe, overrides, steps, warmup, windows, json_path, plot_png):
    """End-to-end img/s of RECIPE's real training steps, beside its loader alone and its model alone, with MFU."""
    cfg = _load(recipe, overrides).check_paths()  # bad input answers before the heavy imports
    from .bench import bench_e2e
    from .engine.metrics import Progress

    beside = type(cfg.method).baseline  # a method timed beside its baseline runs 4 more windows per window
    with Progress(True, (7 if beside else 3) * windows * steps, "bench e2e", unit="step") as bar:
        res = bench_e2e(cfg, steps, warmup, windows, progress=bar.update)
    if not res["is_main"]:
        return
    click.echo(f"{res['env']['device']}: {res['engine']} engine, {res['precision']}, {res['backend']} loader "
               f"({res['workers']} workers), micro-batch {res['micro_batch']} x {res['world_size']} rank(s)")
    click.echo(f"{'':10s} {'img/s':>10s} {'MFU':>7s}")
    for name in ("loader", "model", "e2e"):
        r = res[name]
        util = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        click.echo(f"{name:10s} {r['img_per_s']:10.1f} {util:>7s}")
    if "without_teacher" in res:
        wt = res["without_teacher"]
        for name in ("model", "e2e"):
            click.echo(f"{name + ' ' + wt['baseline']:10s} {wt[name]['img_per_s']:10.1f} {'-':>7s}   without the "
                       f"teacher; {res['method']} runs at {wt[name]['with_teacher_vs_without']:.2f}x (alternating windows)")
    click.echo(f"end-to-end = {res['e2e']['vs_model']:.2f}x model-only, {res['e2e']['vs_loader']:.2f}x loader-only; "
               f"bound by the {res['bound_by']}; {res['train_gflops_per_image']} GFLOP/image, peak "
               f"{res['peak']['tflops']} TFLOP/s ({res['peak']['source']})")
    _write_json(res, json_path)
    _write_plot("e2e", res, plot_png)


@bench.command("loader")
@click.option("--data", "data_path", required=True, type=click.Path(file_okay=False), help="Class-folder tree.")
@click.option("--beton", type=click.Path(dir_okay=False), default=None, help="The same images as a .beton, for ffcv.")
@click.option("--backends", default=None, help="Default: torchvision,turbo,ffcv,ffcv-stock,dali with --beton, else "
              "torchvision,turbo,dali. ffcv-stock: FFCV's own decoder (data.ffcv_decoder=stock). "
              "tv-decode: torchvision.io.decode_jpeg on --device (batched nvJPEG on CUDA), crop and flip there too.")
@click.option("--workers", default=2, show_default=True, help="Decoding workers (processes, FFCV or DALI threads).")
@click.option("--batch", default=64, show_default=True)
@click.option("--img-size", default=224, show_default=True)
@click.option("--epochs", default=3, show_default=True, help="Timed epochs after one warm-up epoch (median reported).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="fp32", show_default=True,
              help="dtype the batches are normalised to on the device (training delivers its compute dtype).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), default=None, help="Also draw the results as bars (PNG).")
def bench_loader_cmd(data_path, beton, backends, workers, batch, img_size, epochs, device, precision, json_path,
                     plot_png):
    """Loader-only img/s per backend, the decode-only ceiling, and each backend's ratio to torchvision."""
    from .bench_loader import bench_loader

    backends = backends or ("torchvision,turbo,ffcv,ffcv-stock,dali" if beton else "torchvision,turbo,dali")
    names = [b.strip() for b in backends.split(",") if b.strip()]
    res = bench_loader(data_path, names, beton, workers, batch, img_size, epochs, device,
                       progress=lambda msg: click.echo(msg, err=True), precision=precision)
    click.echo(f"{res['images']} images in {data_path}, {workers} workers, batch {batch}, {img_size} px, "
               f"{res['precision']} on {res['device']}, median of {epochs} epochs after a warm-up epoch")
    click.echo(f"{'backend':14s} {'img/s':>9s} {'vs torchvision':>15s} {'vs ffcv-stock':>14s} {'of decode-only':>15s}")
    for name, r in res["backends"].items():
        tv = f"{r['ratio_vs_torchvision']:.2f}x" if r["ratio_vs_torchvision"] else "-"
        stock = f"{r['ratio_vs_ffcv_stock']:.2f}x" if r["ratio_vs_ffcv_stock"] else "-"
        click.echo(f"{name:14s} {r['img_per_s']:9.1f} {tv:>15s} {stock:>14s} {r['of_decode_only']:>14.2f}x")
    click.echo(f"{'decode only':14s} {res['decode_only_img_per_s']:9.1f}   (ceiling: decode at stored size, no augmentation)")
    _write_json(res, json_path)
    _write_plot("loader", res, plot_png)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True})
@click.argument("recipe", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--budget-s", default=300.0, show_default=True, help="Seconds of measurement in all.")
@click.option("--ranks-per-node", default=1, show_default=True,
              help="Tune for one of N ranks on this node: pinned to its 1/N share of the cores.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Default: RECIPE.tuned.yaml beside it.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
def tune(recipe, overrides, budget_s, ranks_per_node, out, json_path):
    """Measure RECIPE's input pipeline over its knobs (workers, batches ahead, the backend's own) and write
    RECIPE.tuned.yaml: `base:` RECIPE plus the fastest values, with the measured table in its comments."""
    from .engine.metrics import Progress
    from .tune import tune as run_tune

    bar = None

    def progress(done, total, msg):
        nonlocal bar
        if bar is None:
            bar = Progress(True, total, "tune", unit="setting", interval=0.0)
        bar.update(done - bar.n, postfix={"last": msg})

    res = run_tune(recipe, overrides, budget_s, ranks_per_node, out, progress)
    if bar is not None:
        bar.close()
    click.echo(f"{'knob':28s} {'value':>8s} {'img/s':>9s}")
    for r in res["table"]:
        click.echo(f"data.{r['knob']:23s} {str(r['value']):>8s} {r['img_per_s']:9.1f}")
    chosen = " ".join(f"{k}={v}" for k, v in res["chosen"].items())
    before = f"{res['recipe_img_per_s']:.0f}" if res["recipe_img_per_s"] else "not measured: its data.workers is not a candidate here"
    click.echo(f"chosen: {chosen}: {res['img_per_s']:.0f} img/s (the recipe as written: {before}); wrote {res['tuned']}")
    _write_json(res, json_path)


def _eval_options(f):
    """CHECKPOINT, KEY=VALUE overrides, --train, --test, --recipe, --json: what knn and linprobe share."""
    for deco in reversed([
        click.argument("checkpoint", type=click.Path()),
        click.argument("overrides", nargs=-1),
        click.option("--train", "train_data", required=True, type=click.Path(exists=True),
                     help="Training images (the k-NN bank, the probe's training set): a class-folder tree or a .beton."),
        click.option("--test", "test_data", required=True, type=click.Path(exists=True),
                     help="Scored images: a class-folder tree or a .beton."),
        click.option("--recipe", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Base config instead of the run's own: for checkpoints from elsewhere, or scratch."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here."),
    ]):
        f = deco(f)
    return f


def _eval_setup(checkpoint: str, recipe: Optional[str], overrides: List[str]):
    if checkpoint != "scratch" and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (or pass scratch for a random initialisation)")
    from .eval.checkpoints import eval_config

    return eval_config(checkpoint, recipe, overrides)


@main.command()
@_eval_options
def knn(checkpoint, overrides, train_data, test_data, recipe, json_path):
    """Weighted k-NN accuracy (cosine, knn.k=20, knn.temperature=0.07) of the backbone in CHECKPOINT: a fastvit
    checkpoint, run directory or exported model, a facebookresearch/mae or mae-lite checkpoint, a timm state
    dict, or `scratch` (a random initialisation from train.seed, the baseline). Images are read as the run was
    trained (its model, image and patch size, data.mean and data.std), or as --recipe says; KEY=VALUE overrides
    either (knn.k=10 data.workers=0 engine.device=cpu)."""
    from .eval.knn import describe_inputs, evaluate_knn

    cfg, origin = _eval_setup(checkpoint, recipe, overrides)
    res = evaluate_knn(checkpoint, train_data, test_data, cfg, origin)
    click.echo(res["import"])
    click.echo(describe_inputs(res))
    click.echo(f"k-NN (k={res['k']}, T={res['temperature']}) on {res['test_images']} images, bank of "
               f"{res['train_images']}: top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}%")
    _write_json(res, json_path)


@main.command()
@_eval_options
def linprobe(checkpoint, overrides, train_data, test_data, recipe, json_path):
    """Linear-probe accuracy (BatchNorm without affine + linear on frozen features; linprobe.optimizer=lars,
    linprobe.epochs=90, linprobe.blr=0.1, seed train.seed) of the backbone in CHECKPOINT (anything `fastvit knn`
    reads), its images read as the run was trained or as --recipe says; KEY=VALUE overrides either."""
    from .eval.knn import describe_inputs
    from .eval.linprobe import evaluate_linear_probe

    cfg, origin = _eval_setup(checkpoint, recipe, overrides)
    res = evaluate_linear_probe(checkpoint, train_data, test_data, cfg, origin)
    click.echo(res["import"])
    click.echo(describe_inputs(res))
    click.echo(f"linear probe ({res['optimizer']}, {res['epochs']} epochs, lr {res['lr']:g}) on {res['test_images']} "
               f"images: top-1 {res['top1']:.2f}%, top-5 {res['top5']:.2f}%")
    _write_json(res, json_path)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), default=None,
              help="Also draw the runs' curves here (PNG): loss, and k-NN and eval top-1 where logged.")
def report(runs, plot_png) -> None:
    """Compare run directories side by side (markdown): init, epochs, best / last eval top-1, last loss."""
    from .engine.metrics import runs_table

    click.echo(runs_table(runs))
    if plot_png:
        from .analysis.plots import run_curves

        click.echo(f"wrote {run_curves(runs, plot_png)}")


@main.group()
def analyze() -> None:
    """Look inside a trained model."""


@analyze.command("recon")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "out_png", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: recon.png beside the checkpoint).")
@click.option("--data", "data_path", default=None, help="Image folder to draw from (default: the run's data.path).")
@click.option("-n", "num", default=8, show_default=True, help="How many images.")
def analyze_recon(checkpoint: str, out_png: Optional[str], data_path: Optional[str], num: int) -> None:
    """Save a PNG grid: original | masked input | reconstruction | reconstruction with visible patches.
    CHECKPOINT is a checkpoint file or a run directory (its latest checkpoint)."""
    from .analysis.reconstruct import save_reconstructions

    path = save_reconstructions(checkpoint, out_png, data_path, num)
    click.echo(f"wrote {path}")


def _analysis_options(f):
    """--data, --images, --batch, --out, --recipe, --labels: what the analyses share."""
    for deco in reversed([
        click.option("--data", "data_path", required=True, type=click.Path(exists=True),
                     help="Images (class-folder tree or .beton), read with the evaluation transform."),
        click.option("--images", default=2000, show_default=True, help="How many images (a seeded shuffle of --data)."),
        click.option("--batch", default=64, show_default=True, help="Images per minibatch."),
        click.option("--out", "out_png", type=click.Path(dir_okay=False), default=None,
                     help="PNG to write; the JSON goes beside it [default: ./cka.png, ./attention.png]."),
        click.option("--recipe", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Config for checkpoints without a run config (mae-lite, facebookresearch/mae, timm files)."),
        click.option("--labels", default=None, help="Comma-separated legend names [default: the run directories']."),
    ]):
        f = deco(f)
    return f


def _labels(labels: Optional[str]) -> List[str]:
    return [x.strip() for x in labels.split(",")] if labels else []


def _check_checkpoints(checkpoints) -> None:
    """A mistyped checkpoint answers before torch is imported."""
    for ck in checkpoints:
        if ck is not None and ck != "scratch" and not Path(ck).exists():
            raise FileNotFoundError(f"checkpoint not found: {ck} (or pass scratch for a random initialisation)")


@analyze.command("cka")
@click.argument("a")
@click.argument("b", required=False)
@_analysis_options
def analyze_cka(a, b, data_path, images, batch, out_png, recipe, labels) -> None:
    """Linear CKA (minibatch, unbiased HSIC) between every layer of A and every layer of B (A itself when B is
    absent): a heatmap PNG and a JSON of the matrix. A and B are anything `fastvit knn` reads, or scratch."""
    _check_checkpoints([a, b])
    from .analysis.inspect import analyze_cka as run, summary_lines

    res = run(a, b, data_path, images, batch, out_png, recipe, _labels(labels))
    for line in summary_lines(res):
        click.echo(line)
    click.echo(f"wrote {res['png']} and {res['json']}")


@analyze.command("attention")
@click.argument("checkpoints", nargs=-1, required=True)
@_analysis_options
def analyze_attention(checkpoints, data_path, images, batch, out_png, recipe, labels) -> None:
    """Mean attention distance (px) and entropy of every layer and head (CLS excluded), averaged over the images,
    for one or more CHECKPOINTS (one colour each): a PNG with both panels and a JSON."""
    _check_checkpoints(checkpoints)
    from .analysis.inspect import analyze_attention as run, summary_lines

    res = run(checkpoints, data_path, images, batch, out_png, recipe, _labels(labels))
    for line in summary_lines(res):
        click.echo(line)
    click.echo(f"wrote {res['png']} and {res['json']}")


if __name__ == "__main__":  # pragma: no cover
    main()
