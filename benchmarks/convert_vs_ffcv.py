#!/usr/bin/env python3
"""`fastvit convert` against FFCV's plain writer on the same class-folder tree, at the same settings.

The plain writer is FFCV's ImageNet recipe: torchvision's ImageFolder hands PIL images to DatasetWriter with
RGBImageField(write_mode="jpg", max_resolution=M, jpeg_quality=Q), so every image is decoded, resized and
re-encoded. Both use the same number of worker processes. Every (--max-res, writer) case runs once per round,
side by side; round 0 warms the page cache, numba and imports and is not counted; medians of --repeats.

    python benchmarks/convert_vs_ffcv.py --src data/bench_imagenet --workers 2 --max-res 256 512 --repeats 5 \\
        --json 'benchmarks/results/cpu_convert_{max_res}.json'
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def plain_ffcv(src, out, max_res, quality, workers):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(src)
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=max_res, jpeg_quality=quality), "label": IntField()}
    DatasetWriter(out, fields, num_workers=workers).from_indexed_dataset(ds, chunksize=100)
    return None


def ours(src, out, max_res, quality, workers):
    from pipelines.beton import ConvertSettings, convert

    return convert(src, out, ConvertSettings(max_res=max_res, quality=quality, workers=workers))["stored"]


def environment():
    from importlib.metadata import version  # ffcv 1.0.2's own __version__ still says 0.0.3rc1

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    names = ("ffcv", "numba", "opencv-python", "pillow", "torchvision")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            **{name: version(name) for name in names}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--max-res", type=int, nargs="+", default=[512], help="One or more; all run in every round.")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="Results per --max-res; '{max_res}' in the path names the size.")
    a = ap.parse_args()
    if a.json and len(a.max_res) > 1 and "{max_res}" not in a.json:
        ap.error("--json: with several --max-res values the path needs '{max_res}'")
    src = Path(a.src)
    # what both writers read: files inside class folders, hidden ones passed over
    n = sum(1 for p in src.rglob("*") if p.is_file() and len(p.relative_to(src).parts) > 1
            and not any(part.startswith(".") for part in p.relative_to(src).parts))
    writers = (("ffcv_plain", plain_ffcv), ("fastvit_convert", ours))
    times = {(m, name): [] for m in a.max_res for name, _ in writers}
    sizes, stored = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats + 1):
            for m in a.max_res:
                for name, fn in writers:
                    out = os.path.join(tmp, f"{name}_{m}.beton")
                    t0 = time.perf_counter()
                    what = fn(a.src, out, m, a.quality, a.workers)
                    dt = time.perf_counter() - t0
                    sizes[m, name] = os.path.getsize(out)
                    if what:
                        stored[m] = what
                    if r:
                        times[m, name].append(dt)
                    print(f"round {r} max_res {m} {name}: {dt:.2f} s ({n / dt:.0f} img/s)", file=sys.stderr)
    env = environment()
    for m in a.max_res:
        t = {name: times[m, name] for name, _ in writers}
        med = {k: statistics.median(v) for k, v in t.items()}
        res = {
            "src": a.src, "images": n, "workers": a.workers, "max_res": m, "quality": a.quality,
            "seconds": t, "median_s": med, "img_per_s": {k: round(n / v, 1) for k, v in med.items()},
            "speedup": round(med["ffcv_plain"] / med["fastvit_convert"], 2),
            "bytes": {name: sizes[m, name] for name, _ in writers}, "fastvit_stored": stored.get(m),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "environment": env,
        }
        print(json.dumps(res, indent=1))
        if a.json:
            Path(a.json.format(max_res=m)).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
