"""Class-folder tree (ImageNet layout) -> FFCV .beton with an RGBImageField and an IntField, in one pass.
Writing lives here, apart from reading (ffcv_loader.py), as in FFCV itself.

An ordered process pool prepares every file once: a baseline RGB JPEG within --max-res keeps its original bytes
(no second lossy step, no decode + re-encode); anything else is decoded (EXIF orientation applied; CMYK,
grayscale, palette and alpha made RGB), area-resized to --max-res and encoded per --mode. Files that do not
decode are skipped with their reason. The main process lays the payloads, in input order, straight into the
file's pages, where FFCV's DatasetWriter with one worker would put them (ffcv/writer.py, memory_allocator.py):
the bytes depend on the input alone. FFCV's own writer is not used: it is fed whole images, and handed prepared
payloads it would only copy each one a second time, in another process that it polls every 0.1 s.
The page size is the smallest power of two >= 8 MiB that holds the largest payload, so a 6000-px image fits
without being cropped. The .beton is written under a temporary name and renamed at the end; a JSON manifest
goes beside it.
"""
from __future__ import annotations

import functools
import io
import json
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .folder import walk_classes

MODES = ("jpg", "raw", "smart")
_MIN_PAGE = 8 << 20  # FFCV's default page size
INSTALL_HINT = "fastvit convert needs OpenCV and numba: pip install 'fastvit_pt[ffcv]'"

# FFCV 1.0's file format (ffcv/types.py; a test holds these to the installed ffcv): header, one descriptor per
# field, one metadata row per sample, then the pages of payloads, then the allocation table
_FORMAT_VERSION = 2
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                    ("alloc_table_ptr", "<u8")], align=True)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_META = np.dtype([("", _IMAGE_META), ("", "<i8")], align=True)  # (image, label): fields f0, f1
_FIELDS = ((2, b"image"), (1, b"label"))  # FFCV's type ids of RGBImageField and IntField
_META_START = _HEADER.itemsize + len(_FIELDS) * _FIELD_DESC.itemsize
_IMAGE_MODES = {"jpg": 0, "raw": 1}


@dataclass
class ConvertSettings:
    max_res: Optional[int] = None
    """Longest side in pixels after conversion; larger images are area-averaged down (as FFCV's INTER_AREA)."""
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


# ------------------------------------------------------------------------------------------ preparing


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


def _target_size(w: int, h: int, max_res: Optional[int]) -> Tuple[int, int]:
    if max_res is None or max(w, h) <= max_res:
        return w, h
    s = max_res / max(w, h)
    return max(1, int(round(w * s))), max(1, int(round(h * s)))


@functools.lru_cache(maxsize=256)
def _area_taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray]:
    """Output pixel o averages the input span [o * s, (o + 1) * s), s = n_in / n_out: the <= ceil(s) + 1 input
    pixels it overlaps ([n_out, k] int32) and the overlapped fraction of each ([n_out, k] float32, rows sum to 1)."""
    s = n_in / n_out
    lo = np.arange(n_out) * s
    idx = np.floor(lo).astype(np.int64)[:, None] + np.arange(int(np.ceil(s)) + 1)
    w = np.clip(np.minimum(lo[:, None] + s, idx + 1) - np.maximum(lo[:, None], idx), 0, None) / s
    w[idx >= n_in] = 0
    return np.minimum(idx, n_in - 1).astype(np.int32), w.astype(np.float32)


def _area_kernel_py(src, ry, wy, rx, wx):
    """src uint8 [H, W, 3] -> uint8 [oh, ow, 3]; numba-compiled by _area_kernel. Rows first: that pass runs over
    whole contiguous lines (vectorised, ~0.1 ms for 500 -> 256 px) and leaves the column pass, which gathers,
    only oh lines (~0.4 ms; three channel sums side by side)."""
    h, w = src.shape[0], src.shape[1]
    oh, ow = ry.shape[0], rx.shape[0]
    flat = src.reshape(h, w * 3)
    rows = np.zeros((oh, w * 3), np.float32)
    for o in range(oh):
        acc = rows[o]
        for k in range(ry.shape[1]):
            wk = wy[o, k]
            line = flat[ry[o, k]]
            for j in range(w * 3):
                acc[j] += wk * line[j]
    out = np.empty((oh, ow, 3), np.uint8)
    top = np.float32(255.0)
    for o in range(oh):
        line = rows[o]
        for x in range(ow):
            v0 = v1 = v2 = np.float32(0.5)  # + 0.5 then truncation: round half up
            for k in range(rx.shape[1]):
                wk, p = wx[x, k], rx[x, k] * 3
                v0 += wk * line[p]
                v1 += wk * line[p + 1]
                v2 += wk * line[p + 2]
            out[o, x, 0] = np.uint8(min(v0, top))
            out[o, x, 1] = np.uint8(min(v1, top))
            out[o, x, 2] = np.uint8(min(v2, top))
    return out


@functools.lru_cache(maxsize=None)
def _area_kernel():
    """Compiled once per machine (numba's cache, beside this file or in ~/.cache); convert loads it before the
    pool forks, so the workers inherit it. cv2's INTER_AREA takes ~1.5 ms of CPU for 500 -> 256 px (its general
    path for non-integer factors), this ~0.55 ms, for the same pixels within 1 level."""
    import numba

    kernel = numba.njit(cache=True, nogil=True)(_area_kernel_py)
    kernel(np.zeros((2, 2, 3), np.uint8), *_area_taps(2, 1), *_area_taps(2, 1))
    return kernel


def _area_resize(arr: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [size[1], size[0], 3], each output pixel the area-weighted mean of what it covers."""
    h, w = arr.shape[:2]
    if (w, h) == size:
        return arr
    return _area_kernel()(np.ascontiguousarray(arr), *_area_taps(h, size[1]), *_area_taps(w, size[0]))


def _store(bgr: np.ndarray, s: ConvertSettings):
    """BGR pixels (OpenCV's order: imencode takes them as they are) -> the payload tuple per --mode."""
    import cv2

    h, w = bgr.shape[:2]
    if s.mode == "raw" or (s.mode == "smart" and bgr.nbytes <= s.smart_threshold):
        return ("raw", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).reshape(-1), w, h, False)
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), s.quality])
    if not ok:
        raise ValueError("OpenCV could not encode the image as JPEG")
    return ("jpg", buf.reshape(-1), w, h, False)


def _prepare_rgb_jpeg(raw: bytes, w: int, h: int, baseline: bool, s: ConvertSettings):
    """An RGB JPEG without EXIF rotation, through OpenCV's libjpeg-turbo: ~0.8 ms to decode 500 x 375 px where
    PIL takes ~1.2 ms (it decodes to RGBX, then copies). None when OpenCV fails; the PIL path then says why."""
    import cv2

    buf = np.frombuffer(raw, dtype=np.uint8)
    size = _target_size(w, h, s.max_res)
    if s.mode == "jpg" and baseline and size == (w, h):
        # keep the original bytes; decoding at 1/8 scale still reads every entropy-coded byte, so a corrupt
        # file is caught at a fraction of the cost of a full decode
        if cv2.imdecode(buf, cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION) is None:
            return None
        return ("jpg", buf, w, h, True)
    # libjpeg's IDCT scaling (1/2, 1/4, 1/8) when the image is >= 2x the target: fewer pixels to decode and to
    # average down; 1/8 is each 8 x 8 block's mean, an area average already
    f = max([f for f in (1, 2, 4, 8) if -(-w // f) >= size[0] and -(-h // f) >= size[1]])
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[f]  # BGR, as imencode takes it
    bgr = cv2.imdecode(buf, flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape != (-(-h // f), -(-w // f), 3):
        return None
    return _store(_area_resize(bgr, size), s)


def prepare_file(path: str, s: ConvertSettings):
    """-> ("jpg"|"raw", payload uint8 [n], width, height, passthrough) or ("skip", reason)."""
    import cv2
    from PIL import Image, ImageOps

    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        return ("skip", f"unreadable: {err.strerror or err}")
    if not raw:
        return ("skip", "empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(raw))  # reads the headers only
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1) if im.format == "JPEG" else 1
        plain = im.format == "JPEG" and im.mode == "RGB" and orientation == 1
        baseline = plain and not im.info.get("progressive")
        # a file cut short has no end-of-image marker: libjpeg can pad it with grey and only warn, so it goes to
        # PIL, which names the fault
        if plain and raw.endswith(b"\xff\xd9"):
            done = _prepare_rgb_jpeg(raw, w, h, baseline, s)
            if done is not None:
                return done
        if s.mode == "jpg" and baseline and (s.max_res is None or max(w, h) <= s.max_res):
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
            return ("jpg", np.frombuffer(raw, dtype=np.uint8), w, h, True)
        im.load()
        rgb = _to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as err:
        return ("skip", f"image too large to decode safely: {err}")
    except Image.UnidentifiedImageError:
        return ("skip", "not an image (unrecognised format)")
    except Exception as err:  # PIL raises many types for bad data; the reason is what the manifest needs
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return ("skip", f"not a decodable image: {type(err).__name__}: {reason}")
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return _store(_area_resize(bgr, _target_size(bgr.shape[1], bgr.shape[0], s.max_res)), s)


_WORKER: Dict = {}  # in each pool worker: the settings and its spill file (fd, path, bytes written)


def _start_worker(spill_prefix: str, s: ConvertSettings) -> None:
    path = f"{spill_prefix}{os.getpid()}"
    _WORKER.update(settings=s, fd=os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), path=path, end=0)


def _prepare(path: str):
    """prepare_file in a pool worker; the payload goes into the worker's spill file and only (spill path,
    offset, size) goes back: pickled through the pool's pipe, 120 MB of payloads cost the main process ~0.3 s of
    CPU, on the same cores as the workers."""
    res = prepare_file(path, _WORKER["settings"])
    if res[0] == "skip":
        return res
    kind, data, w, h, passthrough = res
    offset = _WORKER["end"]
    _pwrite_all(_WORKER["fd"], memoryview(np.ascontiguousarray(data)).cast("B"), offset)
    _WORKER["end"] = offset + data.nbytes
    return (kind, (_WORKER["path"], offset, data.nbytes), w, h, passthrough)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy(src: int, src_off: int, size: int, dst: int, dst_off: int) -> None:
    """File to file inside the kernel (copy_file_range: no pass through this process's memory)."""
    while size:
        try:
            n = os.copy_file_range(src, dst, size, src_off, dst_off)
        except (AttributeError, OSError):  # not Linux, or an old kernel / file system that cannot
            n = os.pwrite(dst, os.pread(src, size, src_off), dst_off)
        if n <= 0:
            raise OSError(f"spill file ended early: {size} bytes missing")
        size, src_off, dst_off = size - n, src_off + n, dst_off + n


# -------------------------------------------------------------------------------------------- writing


class _BetonWriter:
    """Payloads go where FFCV's DatasetWriter(num_workers=1) puts them: after the previous one if it fits in the
    current page, else at the start of the next (no payload straddles two pages: FFCV reads page-wise). Pages
    are written whole, zero-padded; metadata, allocation table and header are written by finish()."""

    def __init__(self, path: Path, capacity: int):
        self.capacity = capacity
        self.meta = np.zeros(capacity, _META)
        self.allocs = np.zeros(capacity, _ALLOC)
        self.src_fd, self.src_off = np.zeros(capacity, np.int32), np.zeros(capacity, np.int64)  # for _repage
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._layout(_MIN_PAGE)

    def _layout(self, page_size: int) -> None:
        self.page_size, self.n = page_size, 0
        # rows for every file, skipped ones left zero: the pages cannot wait for the final count, and readers
        # find each payload by its pointer
        self.data_start = -(-(_META_START + self.capacity * _META.itemsize) // page_size) * page_size
        self.page, self.used = -1, page_size  # no page yet: the first payload opens page 0

    def add(self, kind: str, src: int, offset: int, size: int, w: int, h: int, label: int) -> None:
        """Sample n: `size` bytes at `offset` of the open file `src`."""
        if size > self.page_size:
            self._repage(_page_size(size))
        if size > self.page_size - self.used:
            self.page, self.used = self.page + 1, 0  # the gap before it reads back as zeros
        ptr = self.data_start + self.page * self.page_size + self.used
        _copy(src, offset, size, self.fd, ptr)
        self.used += size
        self.meta[self.n] = ((_IMAGE_MODES[kind], w, h, ptr), label)
        self.allocs[self.n] = (self.n, ptr, size)
        self.src_fd[self.n], self.src_off[self.n] = src, offset
        self.n += 1

    def _repage(self, page_size: int) -> None:
        """A payload larger than a page: lay out again, with larger pages, what was written so far (rare: raw
        pixels of an image over 8 MiB); the result is what one pass with those pages would have written."""
        meta, allocs = self.meta[: self.n].copy(), self.allocs[: self.n].copy()
        os.ftruncate(self.fd, 0)
        self._layout(page_size)
        kinds = {v: k for k, v in _IMAGE_MODES.items()}
        sources = list(zip(self.src_fd[: len(meta)].tolist(), self.src_off[: len(meta)].tolist()))
        for (img, label), (_, _, size), (src, offset) in zip(meta, allocs, sources):
            self.add(kinds[int(img["mode"])], src, offset, int(size), int(img["width"]), int(img["height"]),
                     int(label))

    def finish(self) -> None:
        end = self.data_start + (self.page + 1) * self.page_size
        os.ftruncate(self.fd, end)  # the last page whole, as FFCV writes it
        header = np.zeros(1, _HEADER)
        header[0] = (_FORMAT_VERSION, len(_FIELDS), self.page_size, self.n, end)
        fields = np.zeros(len(_FIELDS), _FIELD_DESC)
        for row, (type_id, name) in zip(fields, _FIELDS):
            row["type_id"] = type_id
            row["name"][: len(name)] = np.frombuffer(name, dtype=np.uint8)
        for offset, part in ((end, self.allocs[: self.n]), (_META_START, self.meta[: self.n]), (0, header),
                             (_HEADER.itemsize, fields)):
            _pwrite_all(self.fd, part.tobytes(), offset)
        os.close(self.fd)
        self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _page_size(largest: int) -> int:
    size = _MIN_PAGE
    while size < largest:
        size *= 2
    if size >= 1 << 32:  # the header keeps it in 32 bits
        raise ValueError(f"a prepared image of {largest} bytes is over the .beton format's 4 GiB page limit")
    return size


def convert(
    src: str | Path,
    out: str | Path,
    settings: Optional[ConvertSettings] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> Dict:
    """Convert SRC to OUT (.beton) and write OUT's manifest (OUT + ".json"). Returns the manifest."""
    s = settings or ConvertSettings()
    s.validate()
    try:
        import cv2  # noqa: F401  (the workers' decoder and encoder)
        import numba  # noqa: F401  (the area resize)
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    src, out = Path(src), Path(out)
    items, classes, skipped = scan_source(src)
    if s.limit is not None and s.limit < len(items):
        keep = np.unique(np.linspace(0, len(items) - 1, s.limit).round().astype(int))
        items = [items[i] for i in keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    spill = f".{out.name}.spill{os.getpid()}."  # + each worker's pid
    labels: List[int] = []
    stored = {"passthrough": 0, "jpg": 0, "raw": 0}
    workers = s.workers or os.cpu_count() or 1
    if s.max_res is not None:
        _area_kernel()  # compiled or loaded here, once, not in every worker
    writer = _BetonWriter(tmp, len(items))
    spills: Dict[str, int] = {}
    try:
        with mp.get_context("fork").Pool(workers, _start_worker, (str(out.parent / spill), s)) as pool:
            for i, ((path, label), res) in enumerate(zip(items, pool.imap(_prepare, [p for p, _ in items], 8))):
                if res[0] == "skip":
                    skipped.append({"path": path, "reason": res[1]})
                else:
                    kind, (spill_path, offset, size), w, h, passthrough = res
                    if spill_path not in spills:
                        spills[spill_path] = os.open(spill_path, os.O_RDONLY)
                    writer.add(kind, spills[spill_path], offset, size, w, h, label)
                    labels.append(label)
                    stored["passthrough" if passthrough else kind] += 1
                if progress:
                    progress("prepare", i + 1, len(items))
        problems = [x for x in skipped if not x["reason"].startswith("hidden")]
        if s.strict and problems:
            raise ConversionError(
                f"--strict: {len(problems)} file(s) could not be converted:\n"
                + "\n".join(f"  {x['path']}: {x['reason']}" for x in problems)
            )
        if not labels:
            raise ValueError(f"{src}: none of its {len(items)} files could be converted")
        writer.finish()
        os.replace(tmp, out)
        if progress:
            progress("write", len(labels), len(labels))  # metadata, allocation table, header: the file is whole
    finally:
        writer.close()
        for fd in spills.values():
            os.close(fd)
        for name in os.listdir(out.parent):  # every worker made one, whether it sent anything back or not
            if name.startswith(spill):
                (out.parent / name).unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    counts = {c: 0 for c in classes}
    for label in labels:
        counts[classes[label]] += 1
    manifest = {
        "output": str(out),
        "source": str(src.resolve()),
        "num_samples": len(labels),
        "classes": classes,
        "counts_per_class": counts,
        "stored": stored,
        "settings": {**asdict(s), "page_size": writer.page_size},
        "fields": {"image": "RGBImageField", "label": "IntField"},
        "skipped": skipped,
    }
    tmp_manifest = out.with_name(f".{out.name}.json.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp_manifest, manifest_path(out))
    return manifest


def manifest_path(beton: str | Path) -> Path:
    return Path(str(beton) + ".json")
