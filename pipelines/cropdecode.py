"""Python side of the crop-decoding JPEG reader (`_cropdecode.c`, built by `pip install` / `make setup`).

The C library decodes only the RandomResizedCrop box of a JPEG (rows above skipped, rows below never read,
columns restricted to the box's iMCUs, DCT-scaled when the box is >= 2x the output) and resamples it, flipped
or not, straight into a sample's slot of the batch. Its functions are plain C called through ctypes, so the
FFCV backend calls them from numba code in FFCV's threads and the turbo backend from a thread pool (ctypes
releases the GIL).

The crop box, filter and flip are a function of the sample's key (`base.sample_seed`; view v of a multi-view
batch: `base.view_key(key, v)`): `rrc_params` here is the Python twin of the C sampler, used by tests and by
anything that wants the box a sample will get.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .base import DecodeError
from .config import EVAL_CROP_RATIO

_FILTER_MODES = {"bilinear": 0, "bicubic": 1, "random": 2}


# fv_sample(data, size, kind, height, width, seed, *epoch, index, train, *args, filter_mode, out_kind, *out, out_h,
# out_w, *error_index); pointers travel as integers (an array's .ctypes.data), which is also how numba passes them
_SAMPLE_ARGS = [ctypes.c_int64] * 16
# fv_sample_view: the same, then key_add (`base.view_key_offset(v)`, added to the key with wraparound)
_SAMPLE_VIEW_ARGS = [ctypes.c_int64] * 17


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec("pipelines._cropdecode")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the crop decoder (pipelines/_cropdecode.c) is not built; run `make setup` or `pip install -e .` "
            "(needs a C compiler and libjpeg-turbo headers: apt-get install -y libjpeg62-turbo-dev)"
        )
    lib = ctypes.CDLL(spec.origin)
    i32p, i64p, u8p, f64p = (ctypes.c_void_p,) * 4
    lib.fv_sample_seed.argtypes = [ctypes.c_int64] * 3
    lib.fv_sample_seed.restype = ctypes.c_int64
    lib.fv_rrc_params.argtypes = [ctypes.c_int64, ctypes.c_int32, ctypes.c_int32] + [ctypes.c_double] * 5 + [
        ctypes.c_int32, i32p]
    lib.fv_rrc_params.restype = None
    lib.fv_center_params.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_double, i32p]
    lib.fv_center_params.restype = None
    lib.fv_jpeg_size.argtypes = [u8p, ctypes.c_int64, i32p, ctypes.c_char_p, ctypes.c_int32]
    lib.fv_decode_box.argtypes = [u8p, ctypes.c_int64, i32p, u8p, ctypes.c_int32, ctypes.c_int32, i32p,
                                  ctypes.c_char_p, ctypes.c_int32]
    lib.fv_resample_box.argtypes = [u8p, ctypes.c_int32, ctypes.c_int32, i32p, u8p, ctypes.c_int32, ctypes.c_int32]
    lib.fv_sample.argtypes = _SAMPLE_ARGS
    try:
        lib.fv_sample_view.argtypes = _SAMPLE_VIEW_ARGS
    except AttributeError:  # a library built before multi-view batches
        raise ImportError(f"the crop decoder at {spec.origin} predates pipelines/_cropdecode.c's fv_sample_view; "
                          "rebuild it with `make setup` or `pip install -e .`") from None
    lib.fv_set_simd.argtypes = [ctypes.c_int32]
    for name in ("fv_jpeg_size", "fv_decode_box", "fv_resample_box", "fv_sample", "fv_sample_view", "fv_set_simd"):
        getattr(lib, name).restype = ctypes.c_int32
    return lib


LIB = _load()

SAMPLE = LIB.fv_sample
"""One sample into its slot of a batch (see fv_sample in _cropdecode.c). Callable from Python (ctypes releases
the GIL: threads decode in parallel) and from numba code (FFCV's operations call C through ctypes there)."""

SAMPLE_VIEW = LIB.fv_sample_view
"""SAMPLE with one more argument, the view's key offset (`base.view_key_offset`): view v of a multi-view batch
is drawn from view_key(key, v) exactly as view 0 is from the key (offset 0 is SAMPLE)."""

ERR_COLOR = -4
"""fv_sample's code for a CMYK or YCCK JPEG (the crop decoder writes RGB from YCbCr or greyscale only)."""

OUT_KINDS = {"uint8": 0, "float32": 1, "bfloat16": 2}
"""fv_sample's out_kind: uint8 [H, W, 3] for a copy to a GPU, or [3, H, W] normalised in the decoding threads
when the batch stays on the host."""


@dataclass(frozen=True)
class CropAug:
    """What the sampler needs: RandomResizedCrop ranges, flip probability and filter choice (training), and
    the centre-crop ratio (evaluation)."""

    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    interpolation: str = "random"
    eval_ratio: float = EVAL_CROP_RATIO

    @property
    def filter_mode(self) -> int:
        return _FILTER_MODES[self.interpolation]

    def as_array(self, mean: Sequence[float] = (0.0,) * 3, std: Sequence[float] = (1.0 / 255.0,) * 3) -> np.ndarray:
        """float64 [12], fv_sample's `args`: scale lo/hi, ratio lo/hi, hflip, eval ratio, then the normalisation
        (mean and std in [0, 1], as PipelineConfig) as mean x 255 and 1 / (std x 255)."""
        norm = [m * 255.0 for m in mean] + [1.0 / (s_ * 255.0) for s_ in std]
        return np.array([*self.scale, *self.ratio, self.hflip, self.eval_ratio, *norm], dtype=np.float64)


# ------------------------------------------------------------------------------------------- sampling

_M64 = 2**64 - 1


def _splitmix64(state: int) -> Tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return state, z ^ (z >> 31)


def rrc_params(key: int, height: int, width: int, aug: CropAug) -> Tuple[int, int, int, int, int, int]:
    """(top, left, h, w, filter 0 bilinear / 1 bicubic, flip) for one sample: the Python twin of the C
    sampler (same splitmix64 stream, same draw order), following torchvision's RandomResizedCrop.get_params."""
    st = key & _M64

    def u() -> float:
        nonlocal st
        st, z = _splitmix64(st)
        return (z >> 11) * (1.0 / 9007199254740992.0)

    flip = int(u() < aug.hflip)
    u_filter = u()
    filt = (0 if u_filter < 0.5 else 1) if aug.filter_mode == 2 else aug.filter_mode
    area = float(height) * float(width)
    lo, hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    for _ in range(10):
        target = area * (aug.scale[0] + (aug.scale[1] - aug.scale[0]) * u())
        aspect = math.exp(lo + (hi - lo) * u())
        u_top, u_left = u(), u()
        w = int(round(math.sqrt(target * aspect)))  # round half to even, like C's nearbyint
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w, filt, flip
    in_ratio = width / height  # torchvision's fallback: the whole image clamped to the ratio range, centred
    if in_ratio < aug.ratio[0]:
        w, h = width, int(round(width / aug.ratio[0]))
    elif in_ratio > aug.ratio[1]:
        h, w = height, int(round(height * aug.ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return top, left, h, w, filt, flip


def rrc_params_c(key: int, height: int, width: int, aug: CropAug) -> Tuple[int, int, int, int, int, int]:
    """The C sampler's answer for one sample (what the decoders use)."""
    out = np.zeros(6, dtype=np.int32)
    LIB.fv_rrc_params(key, height, width, aug.scale[0], aug.scale[1], aug.ratio[0], aug.ratio[1], aug.hflip,
                      aug.filter_mode, out.ctypes.data)
    return tuple(int(v) for v in out)


def center_params(height: int, width: int, ratio: float = EVAL_CROP_RATIO) -> Tuple[int, int, int, int, int, int]:
    out = np.zeros(6, dtype=np.int32)
    LIB.fv_center_params(height, width, ratio, out.ctypes.data)
    return tuple(int(v) for v in out)


# -------------------------------------------------------------------------------------------- decoding

SIMD_LEVELS = {"avx2": 2, "sse4.1": 1, "c": 0}


@contextlib.contextmanager
def simd(level: str):
    """Run the resampler's horizontal pass with at most this instruction set (tests cover each path)."""
    previous = LIB.fv_set_simd(SIMD_LEVELS[level])
    try:
        yield
    finally:
        LIB.fv_set_simd(previous)


_MSG = 256


def _buffer(data) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data


def jpeg_size(data, name: str = "image") -> Tuple[int, int]:
    """(width, height) from the JPEG header; DecodeError naming `name` if it is not a readable JPEG."""
    buf = _buffer(data)
    wh = np.zeros(2, dtype=np.int32)
    msg = ctypes.create_string_buffer(_MSG)
    if LIB.fv_jpeg_size(buf.ctypes.data, buf.size, wh.ctypes.data, msg, _MSG) != 0:
        raise DecodeError(f"cannot decode image {name}: not a readable JPEG ({msg.value.decode(errors='replace')})")
    return int(wh[0]), int(wh[1])


def decode_box(data, params: Sequence[int], size: Tuple[int, int], out: Optional[np.ndarray] = None,
               name: str = "image") -> Tuple[np.ndarray, int]:
    """Decode box params = (top, left, h, w, filter, flip) of a JPEG into out ([size[0], size[1], 3] uint8,
    allocated if None). Returns (out, the DCT scale denominator used)."""
    buf = _buffer(data)
    p = np.asarray(params, dtype=np.int32)
    if out is None:
        out = np.empty((size[0], size[1], 3), dtype=np.uint8)
    info = np.zeros(2, dtype=np.int32)
    msg = ctypes.create_string_buffer(_MSG)
    rc = LIB.fv_decode_box(buf.ctypes.data, buf.size, p.ctypes.data, out.ctypes.data, size[0], size[1],
                           info.ctypes.data, msg, _MSG)
    if rc != 0:
        raise DecodeError(f"cannot decode image {name}: {msg.value.decode(errors='replace') or f'error {rc}'}")
    return out, int(info[0])


def resample_box(pixels: np.ndarray, params: Sequence[int], size: Tuple[int, int]) -> np.ndarray:
    """The same box + resample on decoded RGB pixels [H, W, 3] (FFCV's raw mode; also the tests' reference)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    p = np.asarray(params, dtype=np.int32)
    out = np.empty((size[0], size[1], 3), dtype=np.uint8)
    rc = LIB.fv_resample_box(pixels.ctypes.data, pixels.shape[0], pixels.shape[1], p.ctypes.data, out.ctypes.data,
                             size[0], size[1])
    if rc != 0:
        raise ValueError(f"resample_box: box {tuple(params[:4])} is outside a {pixels.shape[1]}x{pixels.shape[0]} image")
    return out


def why_not_decodable(data) -> str:
    """libjpeg's message for a JPEG that fails to decode (the whole image at 1/1), or '' if it decodes."""
    buf = _buffer(data)
    try:
        w, h = jpeg_size(buf)
        decode_box(buf, (0, 0, h, w, 0, 0), (1, 1))
    except DecodeError as err:
        return str(err).split(": ", 1)[-1]
    return ""
