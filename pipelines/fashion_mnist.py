"""Fashion-MNIST (Debian package `dataset-fashion-mnist`) written as an ImageFolder tree:
OUT/train/<k_name>/<index>.png (60,000) and OUT/test/<k_name>/<index>.png (10,000), 28x28 grayscale.
Class folders carry their index as a prefix so sorted folder order equals the official label ids."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "sudo apt-get install -y dataset-fashion-mnist"
CLASSES = (
    "0_tshirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)
_SPLITS = {"train": "train", "test": "t10k"}
_MARKER = "fashion_mnist.json"


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: the big-endian magic carries the dtype code and the rank."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated: header says {shape}, found {body.size} bytes of data")
    return body.reshape(shape)


def load_split(split: str, source: Path = DEFAULT_SOURCE):
    """(images [N, 28, 28] uint8, labels [N] uint8) of 'train' or 'test'."""
    stem = _SPLITS[split]
    files = {kind: source / f"{stem}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz" for kind in ("images", "labels")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with: {APT_HINT}")
    images, labels = read_idx(files["images"]), read_idx(files["labels"])
    if len(images) != len(labels):
        raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels


def write_fashion_mnist(
    out_dir: str | Path,
    source: str | Path = DEFAULT_SOURCE,
    per_class: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Dict[str, Dict[str, int]]:
    """Write both splits under out_dir; returns {split: {class: count}}. per_class keeps the first N images
    of each class per split (in file order). A finished tree with the same settings is left as it is (its
    marker file records them); each split is written under a temporary name, then renamed."""
    from PIL import Image

    out_dir, source = Path(out_dir), Path(source)
    marker = out_dir / _MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        same = done.get("source") == str(source) and done.get("per_class") == per_class
        if same and all((out_dir / s).is_dir() for s in _SPLITS):
            return done["counts"]
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: Dict[str, Dict[str, int]] = {}
    for split in _SPLITS:
        images, labels = load_split(split, source)
        if per_class is not None:
            keep = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(len(CLASSES))])
            keep.sort()
            images, labels = images[keep], labels[keep]
        tmp = out_dir / f".{split}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for name in CLASSES:
            (tmp / name).mkdir(parents=True)
        for i, (img, lab) in enumerate(zip(images, labels)):  # i: position in the kept subset
            Image.fromarray(img).save(tmp / CLASSES[lab] / f"{i:05d}.png", compress_level=1)
            if progress is not None:
                progress(1)
        final = out_dir / split
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        counts[split] = {CLASSES[k]: int(c) for k, c in zip(*np.unique(labels, return_counts=True))}
    marker.write_text(json.dumps({"source": str(source), "per_class": per_class, "counts": counts}, indent=1))
    return counts
