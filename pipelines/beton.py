"""Class-folder tree (ImageNet layout) -> FFCV .beton, written with FFCV's DatasetWriter, RGBImageField and
IntField. Writing lives here, apart from reading (ffcv_loader.py), as in FFCV itself.

Two phases:
  A. an ordered process pool prepares every file once: a baseline RGB JPEG within --max-res keeps its
     original bytes (no second lossy step, no decode + re-encode); anything else is decoded (EXIF orientation
     applied; CMYK, grayscale, palette and alpha made RGB), resized to --max-res and encoded per --mode. Files
     that do not decode are skipped with their reason. Payloads stream, in input order, into a spill file.
  B. FFCV's DatasetWriter with ONE worker copies the prepared payloads into its pages. FFCV books pages in
     whichever order its workers fill them, so several writer workers would make the file's bytes depend on
     timing; with the work already done in phase A, one copying worker keeps the output byte-identical.
The page size is chosen from the largest payload, so a 6000-px image fits without being cropped. The .beton
is written under a temporary name and renamed at the end; a JSON manifest goes beside it.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .folder import walk_classes

MODES = ("jpg", "raw", "smart")
_MIN_PAGE = 8 << 20  # FFCV's default page size


@dataclass
class ConvertSettings:
    max_res: Optional[int] = None
    """Longest side in pixels after conversion; larger images are resized (cv2 INTER_AREA, as FFCV does)."""
    quality: int = 90
    """JPEG quality for images that must be (re-)encoded."""
    mode: str = "jpg"
    """jpg: store JPEG; raw: store decoded pixels; smart: raw up to smart_threshold bytes of pixels, else JPEG."""
    smart_threshold: int = 256 * 256 * 3
    """smart mode: images with more raw bytes than this are stored as JPEG."""
    workers: int = 0
    """Processes preparing images (0 = every core)."""
    limit: Optional[int] = None
    """Convert only this many files, spread evenly over the sorted list (every class keeps its share)."""
    strict: bool = False
    """Any skipped file makes the conversion fail (no .beton is left)."""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality: expected 1..100, got {self.quality}")
        if self.max_res is not None and self.max_res < 1:
            raise ValueError(f"--max-res: expected a positive number of pixels, got {self.max_res}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit: expected a positive count, got {self.limit}")


class ConversionError(RuntimeError):
    """--strict conversion met files it had to skip; the message lists them."""


# ------------------------------------------------------------------------------------------- scanning


def scan_source(src: Path) -> Tuple[List[Tuple[str, int]], List[str], List[Dict[str, str]]]:
    """(path, label) of every non-hidden file under SRC/<class>/ (decodable or not: phase A finds out), the
    sorted class names, and what was passed over (hidden files and folders, files outside class folders)."""
    return walk_classes(src, kind="source", placeholder="SRC")


# ------------------------------------------------------------------------------------- phase A: prepare


def _to_rgb(im) -> np.ndarray:
    """Any PIL mode -> uint8 RGB [H, W, 3]; transparency is composited over white."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG/TIFF
        arr = np.asarray(im, dtype=np.float64)
        arr = (arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0).round().clip(0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"))


def _resize(arr: np.ndarray, max_res: Optional[int]) -> np.ndarray:
    import cv2

    h, w = arr.shape[:2]
    if max_res is None or max(h, w) <= max_res:
        return arr
    s = max_res / max(h, w)
    return cv2.resize(arr, (max(1, int(round(w * s))), max(1, int(round(h * s)))), interpolation=cv2.INTER_AREA)


def _encode_jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise ValueError("OpenCV could not encode the image as JPEG")
    return buf.reshape(-1)


def prepare_file(path: str, s: ConvertSettings):
    """-> ("jpg"|"raw", payload uint8 [n], width, height, passthrough) or ("skip", reason)."""
    from PIL import Image, ImageOps

    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        return ("skip", f"unreadable: {err.strerror or err}")
    if not raw:
        return ("skip", "empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(raw))
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1) if im.format == "JPEG" else 1
        baseline = im.format == "JPEG" and im.mode == "RGB" and not im.info.get("progressive") and orientation == 1
        if s.mode == "jpg" and baseline and (s.max_res is None or max(w, h) <= s.max_res):
            # keep the original bytes; decoding at 1/8 scale still reads every entropy-coded byte, so a
            # truncated file is caught at a fraction of the cost of a full decode
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
            return ("jpg", np.frombuffer(raw, dtype=np.uint8), w, h, True)
        im.load()
        arr = _resize(_to_rgb(ImageOps.exif_transpose(im)), s.max_res)
    except Image.DecompressionBombError as err:
        return ("skip", f"image too large to decode safely: {err}")
    except Image.UnidentifiedImageError:
        return ("skip", "not an image (unrecognised format)")
    except Exception as err:  # PIL raises many types for bad data; the reason is what the manifest needs
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return ("skip", f"not a decodable image: {type(err).__name__}: {reason}")
    h, w = arr.shape[:2]
    store_raw = s.mode == "raw" or (s.mode == "smart" and arr.nbytes <= s.smart_threshold)
    if store_raw:
        return ("raw", np.ascontiguousarray(arr).reshape(-1), w, h, False)
    return ("jpg", _encode_jpeg(arr, s.quality), w, h, False)


def _prepare(args):
    return prepare_file(*args)


# --------------------------------------------------------------------------------------- phase B: write


class _Spill:
    """Prepared payloads in one file, read back by FFCV's writer worker through a memory map."""

    def __init__(self, path: Path, records: List[Tuple[int, int, str, int, int, int]]):
        self.path, self.records, self._map = path, records, None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        off, size, kind, w, h, label = self.records[i]
        return (kind, self._map[off : off + size], w, h), label


def _encode_prepared(self, destination, item, malloc):
    """RGBImageField.encode for a payload prepared in phase A: copy it, decode nothing. Bound to a plain
    RGBImageField instance, so the file records the standard field type and any FFCV reader opens it."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    kind, data, w, h = item
    destination["mode"] = IMAGE_MODES[kind]
    destination["height"], destination["width"] = h, w
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


def _page_size(largest: int) -> int:
    size = _MIN_PAGE
    while size < largest:
        size *= 2
    return size


def convert(
    src: str | Path,
    out: str | Path,
    settings: Optional[ConvertSettings] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> Dict:
    """Convert SRC to OUT (.beton) and write OUT's manifest (OUT + ".json"). Returns the manifest."""
    from .base import torch_threads_kept

    with torch_threads_kept():  # importing ffcv sets torch's thread count to 1
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    s = settings or ConvertSettings()
    s.validate()
    src, out = Path(src), Path(out)
    items, classes, skipped = scan_source(src)
    if s.limit is not None and s.limit < len(items):
        keep = np.unique(np.linspace(0, len(items) - 1, s.limit).round().astype(int))
        items = [items[i] for i in keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    spill = out.with_name(f".{out.name}.spill{os.getpid()}")
    records: List[Tuple[int, int, str, int, int, int]] = []
    kept_paths: List[str] = []
    stored = {"passthrough": 0, "jpg": 0, "raw": 0}
    largest = 0
    workers = s.workers or os.cpu_count() or 1
    try:
        with open(spill, "wb") as f, mp.get_context("fork").Pool(workers) as pool:
            jobs = pool.imap(_prepare, [(p, s) for p, _ in items], chunksize=8)
            for i, ((path, label), res) in enumerate(zip(items, jobs)):
                if res[0] == "skip":
                    skipped.append({"path": path, "reason": res[1]})
                else:
                    kind, data, w, h, passthrough = res
                    records.append((f.tell(), data.nbytes, kind, w, h, label))
                    kept_paths.append(path)
                    f.write(data.tobytes())
                    largest = max(largest, data.nbytes)
                    stored["passthrough" if passthrough else kind] += 1
                if progress:
                    progress("prepare", i + 1, len(items))
        problems = [x for x in skipped if not x["reason"].startswith("hidden")]
        if s.strict and problems:
            raise ConversionError(
                f"--strict: {len(problems)} file(s) could not be converted:\n"
                + "\n".join(f"  {x['path']}: {x['reason']}" for x in problems)
            )
        if not records:
            raise ValueError(f"{src}: none of its {len(items)} files could be converted")
        image_field = RGBImageField(write_mode="jpg" if s.mode == "jpg" else s.mode, max_resolution=s.max_res,
                                    jpeg_quality=s.quality)
        image_field.encode = types.MethodType(_encode_prepared, image_field)
        page = _page_size(largest)
        writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField()}, page_size=page, num_workers=1)
        with _writer_progress(progress):
            writer.from_indexed_dataset(_Spill(spill, records), chunksize=256)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        spill.unlink(missing_ok=True)
    counts = {c: 0 for c in classes}
    for rec in records:
        counts[classes[rec[5]]] += 1
    manifest = {
        "output": str(out),
        "source": str(src.resolve()),
        "num_samples": len(records),
        "classes": classes,
        "counts_per_class": counts,
        "stored": stored,
        "settings": {**asdict(s), "page_size": page},
        "fields": {"image": "RGBImageField", "label": "IntField"},
        "skipped": skipped,
    }
    tmp_manifest = out.with_name(f".{out.name}.json.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp_manifest, manifest_path(out))
    return manifest


class _StageBar:
    """Stands in for the tqdm bar FFCV's writer draws itself (a second bar, with cursor escapes in a log file):
    its updates go to our progress callback as the "write" stage."""

    def __init__(self, progress: Optional[Callable[[str, int, int], None]], total: int):
        self.progress, self.total, self.n = progress, int(total), 0

    def update(self, n: int) -> None:
        self.n += n
        if self.progress:
            self.progress("write", self.n, self.total)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _writer_progress(progress: Optional[Callable[[str, int, int], None]]):
    import ffcv.writer

    drawn = ffcv.writer.tqdm  # FFCV 1.0 draws `tqdm(total=N)` in DatasetWriter._write_common
    ffcv.writer.tqdm = lambda total=0, **_: _StageBar(progress, total)
    try:
        yield
    finally:
        ffcv.writer.tqdm = drawn


def manifest_path(beton: str | Path) -> Path:
    return Path(str(beton) + ".json")
