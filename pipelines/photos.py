"""An ImageNet-like class-folder tree of real photographs, from the sample images that ordinary Python packages
ship (read from their installed files, offline; none of the packages is imported).

    OUT/n00000000/img_000000.JPEG ... OUT/n0000000{K-1}/...   (K classes, image i in class i % K)
    OUT/.photos.json                                          (what each file was made from; hidden, so loaders
                                                               and `fastvit convert --strict` pass over it)

The first images are the sources themselves (each photograph once, long side capped at max_side); past them,
each image is a random crop of a random source (10-100% of its area, aspect 3/4-4/3) resized to a long side of
max_side: ImageNet's training JPEGs average ~110 KB at about 500x375 px, mostly baseline 4:2:0, so every file
is written as a baseline 4:2:0 JPEG at quality 90-95. Deterministic in the seed, whatever the worker count.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import multiprocessing as mp
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from PIL import Image

MANIFEST = ".photos.json"
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png")
INSTALL_HINT = "pip install scikit-image scikit-learn matplotlib   (or: pip install 'fastvit_pt[photos]')"


@dataclass(frozen=True)
class PackagePhoto:
    """A photograph a package ships: where it lies inside the installed package, and its terms."""

    distribution: str  # the name pip knows
    module: str  # the import name, whose folder holds the file
    file: str  # relative to that folder
    licence: str


# Photographs only (no drawings, test charts or synthetic images); licences as each package's own documentation
# states them (scikit-image: skimage/data/_fetchers.py docstrings; scikit-learn: sklearn/datasets/images/README.txt).
PACKAGE_PHOTOS = (
    PackagePhoto("scikit-image", "skimage", "data/astronaut.png", "public domain (NASA)"),
    PackagePhoto("scikit-image", "skimage", "data/chelsea.png", "CC0 (Stefan van der Walt)"),
    PackagePhoto("scikit-image", "skimage", "data/coffee.png", "CC0 (Rachel Michetti)"),
    PackagePhoto("scikit-image", "skimage", "data/hubble_deep_field.jpg", "public domain (NASA)"),
    PackagePhoto("scikit-image", "skimage", "data/retina.jpg", "CC0 (Mikael Häggström)"),
    PackagePhoto("scikit-image", "skimage", "data/rocket.jpg", "public domain (SpaceX)"),
    PackagePhoto("scikit-image", "skimage", "data/camera.png", "CC0 (Lav Varshney); grayscale"),
    PackagePhoto("scikit-image", "skimage", "data/coins.png", "no known copyright restrictions (Brooklyn Museum); grayscale"),
    PackagePhoto("scikit-image", "skimage", "data/brick.png", "CC0 (CC0Textures); grayscale"),
    PackagePhoto("scikit-image", "skimage", "data/grass.png", "CC0 (DeviantArt linolafett); grayscale"),
    PackagePhoto("scikit-image", "skimage", "data/gravel.png", "CC0 (CC0Textures); grayscale"),
    PackagePhoto("scikit-learn", "sklearn", "datasets/images/china.jpg", "CC BY 2.0 (danielbuechele, Flickr)"),
    PackagePhoto("scikit-learn", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0 (vultilion, Flickr)"),
    PackagePhoto("matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (US Navy)"),
)


@dataclass(frozen=True)
class Source:
    path: str
    origin: str  # "scikit-image 0.26.0: data/chelsea.png" or the folder it came from
    licence: str


def _package_dir(module: str) -> Optional[Path]:
    """The installed folder of a top-level package, found without importing it (skimage's import alone takes
    a second and pulls in scipy)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def find_sources(extra_dirs: Sequence[str | Path] = (), packages: bool = True) -> List[Source]:
    """The photographs available here: those of PACKAGE_PHOTOS whose package is installed, then every
    .jpg/.jpeg/.png directly inside each of `extra_dirs` (sorted by name)."""
    found: List[Source] = []
    for p in PACKAGE_PHOTOS if packages else ():
        root = _package_dir(p.module)
        if root is None or not (root / p.file).is_file():
            continue
        try:
            version = importlib.metadata.version(p.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        found.append(Source(str(root / p.file), f"{p.distribution} {version}: {p.file}", p.licence))
    for d in map(Path, extra_dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"photograph folder not found: {d}")
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in PHOTO_EXTENSIONS and not f.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{d}: no .jpg, .jpeg or .png photographs in it")
        found.extend(Source(str(f), f"{d}: {f.name}", "see that folder") for f in files)
    return found


@dataclass(frozen=True)
class PhotoSettings:
    n: Optional[int] = None
    """Images to write; None = each source once."""
    max_side: int = 500
    """Long side of every derived image, and the cap on the sources' own (ImageNet: ~500 px)."""
    classes: int = 10
    """Class folders; image i goes to class i % classes."""
    seed: int = 0
    quality: tuple = (90, 95)
    """JPEG quality range (a draw per image)."""

    def validate(self) -> None:
        if self.n is not None and self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.max_side < 16:
            raise ValueError(f"--max-side must be >= 16 pixels, got {self.max_side}")
        if self.classes < 1:
            raise ValueError(f"--classes must be >= 1, got {self.classes}")
        lo, hi = self.quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"JPEG quality range must lie in 1..100, got {self.quality}")


_PHOTOS: Dict[str, Image.Image] = {}  # per process: each source decoded once


def _load(path: str) -> Image.Image:
    im = _PHOTOS.get(path)
    if im is None:
        with Image.open(path) as f:
            im = f.convert("RGB")  # grayscale and RGBA sources become 3-channel, as ImageNet's files are
        _PHOTOS[path] = im
    return im


def _render(job) -> tuple:
    """One output image: (relative path, its source index, crop box or None, bytes written)."""
    i, out_dir, sources, s = job
    rng = random.Random(s.seed * 1_000_003 + i)
    derived = i >= len(sources)
    src = rng.randrange(len(sources)) if derived else i
    im = _load(sources[src])
    w, h = im.size
    box = None
    if derived:
        area = rng.uniform(0.1, 1.0) * w * h
        ratio = rng.uniform(3 / 4, 4 / 3)
        cw, ch = min(w, max(1, round((area * ratio) ** 0.5))), min(h, max(1, round((area / ratio) ** 0.5)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        box = (x, y, x + cw, y + ch)
        im = im.crop(box)
        scale = s.max_side / max(cw, ch)
    else:
        scale = min(1.0, s.max_side / max(w, h))
    if scale != 1.0:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    rel = f"n{i % s.classes:08d}/img_{i:06d}.JPEG"
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=rng.randint(*s.quality), subsampling=2, progressive=False, optimize=False)
    path = Path(out_dir) / rel
    path.write_bytes(buf.getvalue())
    return rel, src, box, im.size, buf.tell()


def write_photos(out_dir: str | Path, settings: Optional[PhotoSettings] = None, sources: Optional[List[Source]] = None,
                 workers: int = 1, progress: Optional[Callable[[int, int], None]] = None) -> Dict:
    """Write the tree (see the module docstring) and its manifest; returns the manifest. `sources` defaults to
    `find_sources()`; `progress(done, total)` is called as images are written."""
    s = settings or PhotoSettings()
    s.validate()
    sources = find_sources() if sources is None else sources
    if not sources:
        raise FileNotFoundError(
            "no sample photographs found: none of scikit-image, scikit-learn or matplotlib is installed here. "
            f"Install them with: {INSTALL_HINT}; or pass a folder of photographs with --source DIR"
        )
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder (the tree is written whole, never merged)")
    n = len(sources) if s.n is None else s.n
    for c in range(min(n, s.classes)):
        (out / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    paths = [x.path for x in sources]
    jobs = [(i, str(out), paths, s) for i in range(n)]
    rows = []
    workers = max(1, min(workers or os.cpu_count() or 1, n))
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_render, jobs, chunksize=16) if pool else map(_render, jobs)
        for done, (rel, src, box, size, nbytes) in enumerate(results, 1):
            rows.append({"file": rel, "source": src, "crop": box, "size": list(size), "bytes": nbytes})
            if progress:
                progress(done, n)
    finally:
        if pool:
            pool.close()
            pool.join()
    manifest = {
        "images": n,
        "classes": min(n, s.classes),
        "originals": min(n, len(sources)),
        "derived": max(0, n - len(sources)),
        "mean_kb": round(sum(r["bytes"] for r in rows) / n / 1024, 1),
        "settings": asdict(s),
        "sources": [asdict(x) for x in sources],
        "files": rows,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest
