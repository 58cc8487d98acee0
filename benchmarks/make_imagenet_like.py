#!/usr/bin/env python3
"""Derive an ImageNet-like class-folder tree from a few real photographs, for loader benchmarks.

ImageNet's training JPEGs average ~110 KB at roughly 500x375 to 500x500 px, mostly baseline 4:2:0. Each output
image here is a random crop (10-100% of the source area, aspect 3/4-4/3) of a random source photo, resized so
its long side is 500 px, and saved as a baseline 4:2:0 JPEG at quality 90-95. Deterministic in --seed.

    python benchmarks/make_imagenet_like.py --src ../shared/data/photos --out data/bench_imagenet --n 2000
"""
import argparse
import random
from pathlib import Path

from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, type=Path, help="folder of source photographs")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=2000, help="images to write")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sources = sorted(p for p in args.src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not sources:
        raise SystemExit(f"no photographs in {args.src}")
    rng = random.Random(args.seed)
    photos = [Image.open(p).convert("RGB") for p in sources]
    total = 0
    for i in range(args.n):
        im = rng.choice(photos)
        w, h = im.size
        area = rng.uniform(0.1, 1.0) * w * h
        ratio = rng.uniform(3 / 4, 4 / 3)
        cw, ch = min(w, int(round((area * ratio) ** 0.5))), min(h, int(round((area / ratio) ** 0.5)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch))
        scale = 500 / max(cw, ch)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        d = args.out / f"n{i % args.classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"img_{i:06d}.JPEG"
        crop.save(path, "JPEG", quality=rng.randint(90, 95), subsampling=2, progressive=False, optimize=False)
        total += path.stat().st_size
    print(f"wrote {args.n} images in {args.classes} classes to {args.out}, mean {total / args.n / 1024:.0f} KB")


if __name__ == "__main__":
    main()
