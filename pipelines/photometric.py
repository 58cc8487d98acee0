"""Photometric augmentations of a multi-view batch, in MoCo-v3's order: colour jitter (brightness, contrast,
saturation, hue in a random order per sample), grayscale, Gaussian blur, solarize.

Implemented once, here, as batched torch ops on the device, run by DeviceNormalize on the float 0..255 pixels
[N, 3, H, W] right before it normalises them. One implementation means the same distribution and the same draws
on all four backends (the decoders only crop: PIL, the crop decoder, FFCV and DALI would each need their own copy
and would disagree), and it runs on the GPU, where the batch goes anyway. torchvision's v2 functional ops are the
reference for each op's formula (tests/pipelines/test_views.py compares them); unlike a PIL pipeline, pixels
are not rounded to uint8 between ops.

Randomness: every per-sample draw (apply or not, factors, jitter order, blur sigma) is a counter-based hash of
(view key, draw index), splitmix64's finalizer in int64 torch ops computed on the keys tensor, never the global
RNG: a sample gets the same pixels on any rank count, batch size or backend. Each decision has its own draw index
(`DRAWS`), so turning one op on or off leaves the others' draws as they were.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .base import _int64
from .config import ViewConfig

DRAWS = ("jitter", "brightness", "contrast", "saturation", "hue", "order", "grayscale", "blur", "sigma", "solarize")
"""Draw index of each per-sample decision: uniforms(keys, len(DRAWS))[:, DRAWS.index(name)]."""

_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)
# the crop sampler draws splitmix64(key + j x golden) from the same view key: these draws start from a hashed,
# domain-separated state so that, say, the jitter coin is not the flip coin
_DOMAIN = _int64(0x5851F42D4C957F2D)
_PERMS = list(itertools.permutations(range(4)))  # 24 jitter orders, one picked per sample
_GRAY = (0.2989, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128.0
"""PIL's ImageOps.solarize default: pixels >= 128 become 255 - x."""


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: it copies the sign bit)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors: the products wrap like uint64 ones (same low 64 bits)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """[N] int64 view keys -> [N, n] float64 uniforms in [0, 1) (53 bits each), on the keys' device: draw j of a
    sample is splitmix64's output j + 1 from the state mix(key ^ DOMAIN)."""
    state = _mix(keys.to(torch.int64) ^ _DOMAIN)
    steps = torch.tensor([_int64((j + 1) * 0x9E3779B97F4A7C15) for j in range(n)], dtype=torch.int64,
                         device=keys.device)
    return _srl(_mix(state[:, None] + steps), 11).to(torch.float64) * (1.0 / 2**53)


# --------------------------------------------------------------------------- the ops, float 0..255 [n, 3, H, W]
# per-sample factors are [n] tensors; each op is torchvision's for a float image, with 255 as the bound


def _per_sample(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x.dtype).view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[n, 1, H, W]: torchvision's _rgb_to_grayscale_image, same weights, same operation order."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_sample(f, x)
    return (x * f).add_(other * (1.0 - f)).clamp_(0.0, 255.0)


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """adjust_brightness: x x f, clamped."""
    return (x * _per_sample(f, x)).clamp_(0.0, 255.0)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """adjust_contrast: blend with the mean of the sample's grayscale image."""
    return _blend(x, _luma(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """adjust_saturation: blend with the sample's grayscale image."""
    return _blend(x, _luma(x), f)


def hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """adjust_hue: rotate the hue by f turns (f in [-0.5, 0.5]). torchvision's HSV round trip in closed form, in
    hue sectors (6 per turn) and in 0..255: the hue of its _rgb_to_hsv (same ties: red, then green, wins the max),
    and for its sector table, channel n (R 5, G 3, B 1) = v - chroma clamp(min(k, 4 - k), 0, 1) with
    k = (n + sector) mod 6. Equal up to float rounding; about a third of the passes over the batch."""
    r, g, b = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    chroma = maxc - minc
    inv = torch.where(chroma > 0, chroma, torch.ones_like(chroma)).reciprocal_()  # grey: any hue, chroma 0
    sector = torch.where(maxc == r, (g - b).mul_(inv),
                         torch.where(maxc == g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0)))
    sector.add_(6.0 * f.to(x.dtype).view(-1, 1, 1))
    out = torch.empty_like(x)
    for ch, n in enumerate((5.0, 3.0, 1.0)):
        k = (sector + n).remainder_(6.0)
        ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, ramp.mul_(chroma), out=out[:, ch])
    return out.clamp_(0.0, 255.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """rgb_to_grayscale(num_output_channels=3)."""
    return _luma(x).expand_as(x).contiguous()


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """gaussian_blur with kernel 2 radius + 1 and a per-sample sigma [n]: torchvision's kernel (softmax of
    -(t / sigma)^2 over t = linspace(-lim, lim), lim = radius / sqrt 2), reflect padding, applied separably (two
    1-D passes: K = 2 radius + 1 taps each instead of K^2)."""
    n, c, h, w = x.shape
    size = 2 * radius + 1
    lim = radius / math.sqrt(2.0)
    t = torch.linspace(-lim, lim, size, dtype=x.dtype, device=x.device)
    kernel = torch.softmax(-(t[None, :] / sigma.to(x.dtype)[:, None]).pow(2), dim=1)
    weight = kernel.repeat_interleave(c, dim=0)  # [n c, K]: each sample's kernel for each of its channels
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), weight.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), weight.view(n * c, 1, size, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """solarize at SOLARIZE_THRESHOLD: x >= 128 -> 255 - x."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 255.0 - x, x)


def _apply(x: torch.Tensor, mask: torch.Tensor, op: Callable, *args: torch.Tensor) -> torch.Tensor:
    """x with op applied to the samples where mask is set (args: per-sample [N] tensors). On the CPU only those
    samples are computed; a GPU computes the whole batch and selects, since finding the samples (nonzero) would
    make the host wait for the GPU. Either way the chosen samples get the same values."""
    if x.device.type == "cpu":
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        if idx.numel() == x.shape[0]:
            return op(x, *args)
        x[idx] = op(x[idx], *(a[idx] for a in args))
        return x
    return torch.where(mask.view(-1, 1, 1, 1), op(x, *args), x)


class Photometric:
    """One view's photometric stage: stage(x, view_keys) -> x, x float 0..255 [N, 3, H, W] (consumed: may be
    written in place), view_keys [N] int64 (`base.view_key(keys, v)`), both on the device."""

    def __init__(self, view: ViewConfig):
        self.view = view
        self.radius = math.ceil(3.0 * view.blur_sigma[1])
        # torchvision's ColorJitter leaves out an op whose factor range is the identity
        self.jitter_ops = [(i, op) for i, (op, on) in enumerate(
            ((brightness, view.brightness > 0), (contrast, view.contrast > 0), (saturation, view.saturation > 0),
             (hue, view.hue > 0))) if on]
        self._perms: Dict[torch.device, torch.Tensor] = {}

    def params(self, keys: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every sample's draws, [N] each on the keys' device (order: [N, 4], the jitter ops' positions):
        jitter / grayscale / blur / solarize (bool: applied), brightness / contrast / saturation factors, hue shift,
        sigma, order."""
        v = self.view
        u = uniforms(keys, len(DRAWS))
        d = {name: u[:, i] for i, name in enumerate(DRAWS)}

        def factor(strength: float, draw: torch.Tensor) -> torch.Tensor:
            lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
            return (lo + (hi - lo) * draw).float()

        perms = self._perms.get(keys.device)
        if perms is None:
            perms = self._perms[keys.device] = torch.tensor(_PERMS, dtype=torch.int64, device=keys.device)
        return {
            "jitter": d["jitter"] < v.color_jitter,
            "brightness": factor(v.brightness, d["brightness"]),
            "contrast": factor(v.contrast, d["contrast"]),
            "saturation": factor(v.saturation, d["saturation"]),
            "hue": (v.hue * (2.0 * d["hue"] - 1.0)).float(),
            "order": perms[(d["order"] * len(_PERMS)).long().clamp_(max=len(_PERMS) - 1)],
            "grayscale": d["grayscale"] < v.grayscale,
            "blur": d["blur"] < v.blur,
            "sigma": (v.blur_sigma[0] + (v.blur_sigma[1] - v.blur_sigma[0]) * d["sigma"]).float(),
            "solarize": d["solarize"] < v.solarize,
        }

    def __call__(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        p = self.params(keys)
        if self.view.color_jitter > 0:
            factors = (p["brightness"], p["contrast"], p["saturation"], p["hue"])
            for step in range(4):  # each sample runs its own order: at each step, each op on the samples it is at
                for i, op in self.jitter_ops:
                    x = _apply(x, p["jitter"] & (p["order"][:, step] == i), op, factors[i])
        if self.view.grayscale > 0:
            x = _apply(x, p["grayscale"], grayscale)
        if self.view.blur > 0:
            x = _apply(x, p["blur"], lambda y, s: gaussian_blur(y, s, self.radius), p["sigma"])
        if self.view.solarize > 0:
            x = _apply(x, p["solarize"], solarize)
        return x
