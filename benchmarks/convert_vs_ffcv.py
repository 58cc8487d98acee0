#!/usr/bin/env python3
"""`fastvit convert` against FFCV's plain writer on the same class-folder tree, at the same settings.

The plain writer is FFCV's ImageNet recipe: torchvision's ImageFolder hands PIL images to DatasetWriter with
RGBImageField(write_mode="jpg", max_resolution=M, jpeg_quality=Q), so every image is decoded, resized and
re-encoded. Both use the same number of worker processes. Runs alternate, median of --repeats each.

    python benchmarks/convert_vs_ffcv.py --src data/bench_imagenet --workers 2 --max-res 512 --repeats 3
"""
import argparse
import json
import os
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


def ours(src, out, max_res, quality, workers):
    from pipelines.beton import ConvertSettings, convert

    convert(src, out, ConvertSettings(max_res=max_res, quality=quality, workers=workers))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--max-res", type=int, default=512)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    n = sum(1 for _ in Path(a.src).rglob("*") if _.is_file())
    times = {"ffcv_plain": [], "fastvit_convert": []}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats + 1):  # the first round warms the page cache and numba; not counted
            for name, fn in (("ffcv_plain", plain_ffcv), ("fastvit_convert", ours)):
                out = os.path.join(tmp, f"{name}.beton")
                t0 = time.perf_counter()
                fn(a.src, out, a.max_res, a.quality, a.workers)
                dt = time.perf_counter() - t0
                sizes[name] = os.path.getsize(out)
                if r:
                    times[name].append(dt)
                print(f"round {r} {name}: {dt:.2f} s ({n / dt:.0f} img/s)", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "src": a.src, "images": n, "workers": a.workers, "max_res": a.max_res, "quality": a.quality,
        "seconds": times, "median_s": med, "img_per_s": {k: round(n / v, 1) for k, v in med.items()},
        "speedup": round(med["ffcv_plain"] / med["fastvit_convert"], 2), "bytes": sizes,
    }
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
