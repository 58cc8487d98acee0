"""Scanning a class-folder tree (ImageNet layout: ROOT/<class>/<image>) without importing any backend."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def open_rgb(path: str | Path):
    """A PIL image in RGB, as the torchvision reference reads it (no EXIF rotation); DecodeError naming the file
    when PIL cannot read it."""
    from PIL import Image

    from .base import DecodeError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:  # PIL raises many types; the path is what the user needs
        raise DecodeError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


def walk_classes(root: str | Path, kind: str = "data", placeholder: str = "ROOT"):
    """Every non-hidden file under ROOT/<class>/ (sub-folders included, links followed) as (path, label),
    sorted by path; the sorted class names; and what was passed over (hidden files and folders, files
    outside class folders), each as {"path", "reason"}. `kind` and `placeholder` only word the errors."""
    root = Path(root)
    expected = f"(expected {placeholder}/<class>/<image> files)"
    if not root.is_dir():
        raise FileNotFoundError(f"{kind} folder not found: {root} {expected}")
    passed_over: List[Dict[str, str]] = []
    classes = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name.startswith("."):
            passed_over.append({"path": e.path, "reason": "hidden " + ("folder" if e.is_dir() else "file")})
        elif e.is_dir():
            classes.append(e.name)
        else:
            passed_over.append({"path": e.path, "reason": "not inside a class folder"})
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders inside {expected}")
    files: List[Tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            for d in sorted(d for d in dirnames if d.startswith(".")):
                passed_over.append({"path": os.path.join(dirpath, d), "reason": "hidden folder"})
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                path = os.path.join(dirpath, f)
                if f.startswith("."):
                    passed_over.append({"path": path, "reason": "hidden file"})
                else:
                    files.append((path, label))
    return files, classes, passed_over


def scan_folder(root: str | Path) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, label) for every image (by extension) under ROOT/<class>/, sorted by path, and the sorted class
    names. Hidden files and folders (".name") are not images; they are skipped."""
    files, classes, _ = walk_classes(root)
    samples = [(p, label) for p, label in files if p.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise FileNotFoundError(f"{root}: no images found in its class folders (extensions: {', '.join(IMG_EXTENSIONS)})")
    return samples, classes
