"""Each backend's RandomResizedCrop + flip follow the spec, measured on many samples.

The input is a "coordinate image" (red = x, green = y, scaled to 0..255) the size of a typical photograph:
each output's borders tell the crop box and whether it was flipped. Areas and aspect ratios are compared with
the spec's algorithm (torchvision's RandomResizedCrop sampling, simulated in numpy) by a two-sample
Kolmogorov-Smirnov distance; the flip rate with a binomial bound. Every backend runs multi-view (`VIEWS`):
view 0 is the single-view output bit for bit (tests/pipelines/test_views.py), view 1 is measured the same way at
its own size, view 2's photometric draws are checked against their distributions and against its pixels, and
views 3 and 4 are DINO's multi-crop geometry, a global crop (area 0.4-1) and a local one (area 0.05-0.4 at its own
size), each measured against the spec at its own range."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import PipelineConfig, ViewConfig, build_loader
from pipelines.base import view_key
from pipelines.photometric import Photometric

W, H = 500, 375  # ImageNet-like
OUT = 64
N_COPIES, EPOCHS = 50, 12  # 600 samples per backend
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
# view 2: MoCo-v3's second view, with grayscale raised so its rate is measured on more samples
PHOTO = ViewConfig(size=16, color_jitter=0.8, grayscale=0.3, blur=0.5, blur_sigma=(0.1, 1.0), solarize=0.2)
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)  # DINO's global and local crops (96 px of 224; 24 of 64 here)
VIEWS = [ViewConfig(), ViewConfig(size=40), PHOTO, ViewConfig(crop_scale=GLOBAL_SCALE),
         ViewConfig(size=24, crop_scale=LOCAL_SCALE)]
GEOMETRY = {0: SCALE, 1: SCALE, 3: GLOBAL_SCALE, 4: LOCAL_SCALE}  # view -> its crop-area range


@pytest.fixture(scope="module")
def coord_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords")
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    img = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    (root / "c").mkdir()
    Image.fromarray(img).save(root / "c" / "0000.png")
    for i in range(1, N_COPIES):
        (root / "c" / f"{i:04d}.png").symlink_to(root / "c" / "0000.png")
    return root


@pytest.fixture(scope="module")
def coord_jpeg_tree(coord_tree):
    """The coordinate image as a quality-100 JPEG (4:4:4), for the turbo backend's crop decoder: the JPEG path,
    not PIL's fallback for PNGs."""
    root = coord_tree.parent / "coords_jpeg"
    (root / "c").mkdir(parents=True, exist_ok=True)
    Image.open(coord_tree / "c" / "0000.png").save(root / "c" / "0000.jpg", quality=100, subsampling=0)
    for i in range(1, N_COPIES):
        (root / "c" / f"{i:04d}.jpg").symlink_to(root / "c" / "0000.jpg")
    return root


def spec_samples(n, rng, scale=SCALE):
    """torchvision's RandomResizedCrop.get_params for a W x H image: (area fraction, aspect w/h)."""
    out = []
    log_r = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(n):
        for _ in range(10):
            area = W * H * rng.uniform(*scale)
            ar = math.exp(rng.uniform(*log_r))
            w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < w <= W and 0 < h <= H:
                break
        else:  # fallback: the largest central crop within the ratio range
            r = W / H
            w, h = (W, int(round(W / RATIO[1]))) if r > RATIO[1] else (int(round(H * RATIO[0])), H) if r < RATIO[0] else (W, H)
        out.append((w * h / (W * H), w / h))
    return np.array(out)


def measured_samples(root, backend, scale=SCALE, views=None):
    """((crop area fraction, aspect) [n, 2], flipped [n]) for each view, measured from its borders (a view with
    photometric ops gives its raw images [n, 3, S, S] and keys [n] instead)."""
    path = root
    if backend == "ffcv":  # raw pixels: a JPEG round trip would blur the coordinates
        from pipelines.beton import ConvertSettings, convert

        path = root.parent / "coords.beton"
        if not path.exists():
            convert(root, path, ConvertSettings(mode="raw", workers=2))
    if backend == "turbo":
        path = root.parent / "coords_jpeg"
    cfg = PipelineConfig(backend=backend, path=str(path), workers=0 if backend == "torchvision" else 2,
                         interpolation="random",
                         crop_scale=scale, crop_ratio=RATIO, mean=(0, 0, 0), std=(1, 1, 1))
    loader = build_loader(cfg, img_size=OUT, batch_size=N_COPIES, seed=7, device="cpu", views=views)
    n_views = len(views or [None])
    crops, flips, raw, keys = [[] for _ in range(n_views)], [[] for _ in range(n_views)], [[] for _ in range(n_views)], []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for b in loader:
            keys.append(b.keys)
            for v, x in enumerate(b.views):
                raw[v].append(x)
                img = x * 255  # mean 0, std 1: back to 0..255
                size = img.shape[-1]
                r, g = img[:, 0], img[:, 1]
                left, right = r[:, :, 0].mean(1), r[:, :, -1].mean(1)
                top, bottom = g[:, 0, :].mean(1), g[:, -1, :].mean(1)
                flipped = left > right
                # the border pixel centres sit half an output pixel inside the crop: widen by one output pixel
                cw = (left - right).abs() / 255 * (W - 1) * size / (size - 1)
                ch = (bottom - top).abs() / 255 * (H - 1) * size / (size - 1)
                crops[v] += list(zip((cw * ch / (W * H)).tolist(), (cw / ch).tolist()))
                flips[v] += flipped.tolist()
    out = [(np.array(c), np.array(f)) for c, f in zip(crops, flips)]
    if views is None:
        return out[0]
    return out, [torch.cat(x) for x in raw], torch.cat(keys)


def ks_distance(a, b):
    grid = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return np.abs(ca - cb).max()


def _crit(n, m):
    """Two-sample KS critical distance at alpha = 0.001."""
    return 1.95 * math.sqrt((n + m) / (n * m))


@pytest.mark.parametrize("backend", ["torchvision", "ffcv", "dali", "turbo"])
def test_crop_area_aspect_and_flip_follow_the_spec(coord_tree, coord_jpeg_tree, backend):
    measured, raw, keys = measured_samples(coord_tree, backend, views=VIEWS)
    for v, scale in GEOMETRY.items():  # plain crops of their own sizes and area ranges
        crops, flips = measured[v]
        spec = spec_samples(20_000, np.random.default_rng(0), scale)
        n = len(crops)
        assert n == N_COPIES * EPOCHS
        crit = _crit(n, len(spec))
        d_area = ks_distance(crops[:, 0], spec[:, 0])
        d_ratio = ks_distance(np.log(crops[:, 1]), np.log(spec[:, 1]))
        assert d_area < crit, f"{backend} view {v}: crop-area distribution is off the spec (KS {d_area:.3f} >= {crit:.3f})"
        assert d_ratio < crit, f"{backend} view {v}: aspect-ratio distribution is off the spec (KS {d_ratio:.3f} >= {crit:.3f})"
        rate = flips.mean()
        assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / n), f"{backend} view {v}: flip rate {rate:.3f}"
    # the local crops are told apart from the global ones: the statistic sees a wrong area range
    local_vs_global = ks_distance(measured[4][0][:, 0], spec_samples(20_000, np.random.default_rng(0), GLOBAL_SCALE)[:, 0])
    assert local_vs_global > _crit(N_COPIES * EPOCHS, 20_000)
    # view 1 is not view 0 again: its own crops
    assert (measured[0][0][:, 0] != measured[1][0][:, 0]).mean() > 0.9
    # view 2: the pixels are grey exactly where its grayscale draw fired (the coordinate image has r != g)
    x = raw[2]
    grey = ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1)
    params = Photometric(PHOTO).params(view_key(keys, 2))
    assert grey.tolist() == params["grayscale"].tolist()
    assert x.shape == (N_COPIES * EPOCHS, 3, 16, 16)


def ks_uniform(x, lo, hi):
    """One-sample KS distance of x from U[lo, hi]."""
    x = np.sort((np.asarray(x, dtype=np.float64) - lo) / (hi - lo))
    n = len(x)
    return max((np.arange(1, n + 1) / n - x).max(), (x - np.arange(n) / n).max())


def test_photometric_draws_follow_their_distributions():
    """Over the real keys of 2 epochs of 1,000 samples: apply rates within a binomial bound, factors uniform on
    torchvision's ranges (KS), each jitter op first a quarter of the time; and the draws of two views unrelated."""
    from pipelines.base import sample_seeds

    keys = torch.cat([sample_seeds(7, e, range(1000)) for e in range(2)])
    n = len(keys)
    p = Photometric(PHOTO).params(view_key(keys, 2))
    for name, want in (("jitter", 0.8), ("grayscale", 0.3), ("blur", 0.5), ("solarize", 0.2)):
        rate = p[name].double().mean().item()
        assert abs(rate - want) < 4 * math.sqrt(want * (1 - want) / n), f"{name} applied at {rate:.3f}, not {want}"
    crit = 1.95 / math.sqrt(n)
    for name, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                         ("hue", -0.1, 0.1), ("sigma", 0.1, 1.0)):
        x = p[name].numpy()
        assert lo <= x.min() and x.max() <= hi, f"{name} outside [{lo}, {hi}]"
        d = ks_uniform(x, lo, hi)
        assert d < crit, f"{name}: KS {d:.3f} >= {crit:.3f} from U[{lo}, {hi}]"
    for op in range(4):
        first = (p["order"][:, 0] == op).double().mean().item()
        assert abs(first - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n), f"jitter op {op} first in {first:.3f}"
    assert len({tuple(o) for o in p["order"].tolist()}) == 24
    q = Photometric(PHOTO).params(view_key(keys, 1))
    for name in ("brightness", "hue", "sigma"):
        r = np.corrcoef(p[name].numpy(), q[name].numpy())[0, 1]
        assert abs(r) < 4 / math.sqrt(n), f"{name}: views 1 and 2 correlated ({r:.3f})"


def test_the_photometric_statistic_can_fail():
    """A biased draw is caught: the same KS distance on brightness factors from U[0.6, 1.2]."""
    rng = np.random.default_rng(0)
    assert ks_uniform(rng.uniform(0.6, 1.2, 2000), 0.6, 1.4) > 1.95 / math.sqrt(2000)


@pytest.mark.parametrize("backend", ["dali", "turbo"])
def test_the_statistic_can_fail(coord_tree, coord_jpeg_tree, backend):
    """A real loader cropping at scale (0.5, 1) instead of the spec's (0.08, 1) is caught (KS ~0.6 here)."""
    crops, _ = measured_samples(coord_tree, backend, scale=(0.5, 1.0))
    spec = spec_samples(20_000, np.random.default_rng(0))
    crit = 1.95 * math.sqrt((len(crops) + len(spec)) / (len(crops) * len(spec)))
    assert ks_distance(crops[:, 0], spec[:, 0]) > crit
