"""Scanning a class-folder tree (ImageNet layout: ROOT/<class>/<image>) without importing any backend."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_folder(root: str | Path) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, label) for every image under ROOT/<class>/ (sub-folders included, links followed), sorted by
    path, and the sorted class names. Hidden files and folders (".name") are not images; they are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root} (expected ROOT/<class>/<image> files)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders inside (expected ROOT/<class>/<image> files)")
    samples: List[Tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    if not samples:
        raise FileNotFoundError(f"{root}: no images found in its class folders (extensions: {', '.join(IMG_EXTENSIONS)})")
    return samples, classes
