"""Multi-view batches (build_loader(views=...)) on every backend, the view keys, and the photometric stage against
torchvision's ops. Real photographs; DALI on its CPU operators."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pipelines import PipelineConfig, ViewConfig, build_loader
from pipelines import photometric as P
from pipelines.base import (VIEW_STRIDE, DeviceNormalize, HostView, sample_seed, sample_seeds, view_key,
                            view_key_offset)

from test_loaders import _source

BACKENDS = ["torchvision", "ffcv", "dali", "turbo"]
KEYED = ["torchvision", "ffcv", "turbo"]  # DALI's crops come from its own Philox streams
# MoCo-v3's second view, at 16 px (blur radius ceil(3 x 1.0) = 3 < 16)
PHOTO = ViewConfig(size=16, color_jitter=0.8, grayscale=0.2, blur=0.5, blur_sigma=(0.1, 1.0), solarize=0.2)
TWO = [ViewConfig(), PHOTO]


def _loader(root, backend, views=None, **kw):
    cfg = PipelineConfig(backend=backend, path=str(_source(root, backend)), interpolation="random",
                         workers=0 if backend == "torchvision" else 2, ffcv_decoder=kw.pop("ffcv_decoder", "crop"))
    args = dict(img_size=32, batch_size=8, seed=1, device="cpu", dtype=torch.float32)
    args.update(kw)
    return build_loader(cfg, views=views, **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_views_of_different_sizes(photo_tree, backend, dtype):
    """One tensor per view, each its own size; view 0 is the single-view loader's images bit for bit (keyed
    backends: drawn from the same key; DALI: view 0's operators are created first and keep their seeds)."""
    single = next(iter(_loader(photo_tree, backend, dtype=dtype)))
    multi = next(iter(_loader(photo_tree, backend, TWO, dtype=dtype)))
    assert [v.shape for v in multi.views] == [(8, 3, 32, 32), (8, 3, 16, 16)]
    assert all(v.dtype == dtype and v.is_contiguous() for v in multi.views)
    assert multi.images is multi.views[0] and len(multi.more_views) == 1
    assert torch.equal(multi.keys, single.keys) and torch.equal(multi.labels, single.labels)
    assert torch.equal(multi.images, single.images)
    assert single.more_views == [] and len(single.views) == 1
    x = multi.more_views[0].float()
    assert torch.isfinite(x).all() and -2.2 < x.min() < x.max() < 2.7


def test_stock_ffcv_decoder_serves_views(photo_tree):
    b = next(iter(_loader(photo_tree, "ffcv", [ViewConfig(), ViewConfig(size=16, hflip=0.0)],
                          ffcv_decoder="stock")))
    assert [v.shape for v in b.views] == [(8, 3, 32, 32), (8, 3, 16, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_views_are_centre_crops_without_photometric_ops(photo_tree, backend):
    a = next(iter(_loader(photo_tree, backend, [ViewConfig(size=16), PHOTO], train=False, seed=1)))
    b = next(iter(_loader(photo_tree, backend, [ViewConfig(size=16), ViewConfig(size=16)], train=False, seed=2)))
    assert torch.equal(a.images, b.images) and torch.equal(a.more_views[0], b.more_views[0])
    assert torch.equal(a.images, a.more_views[0])


def _by_key(loader):
    out = {}
    for b in loader:
        for i, k in enumerate(b.keys.tolist()):
            out[k] = [v[i] for v in b.views]
    return out


@pytest.mark.parametrize("backend", KEYED)
def test_views_are_a_function_of_the_key(photo_tree, backend):
    """A sample's views (crops and photometric ops) are the same on rank 1 of 2 with batches of 4 as on 1 rank
    with batches of 8: nothing depends on the batch it lands in."""
    one = _loader(photo_tree, backend, TWO, batch_size=8)
    two = _loader(photo_tree, backend, TWO, batch_size=4, rank=1, world_size=2)
    for loader in (one, two):
        loader.set_epoch(3)
    ref, got = _by_key(one), _by_key(two)
    assert len(got) == 24 and set(got) <= set(ref)
    for k, views in got.items():
        assert all(torch.equal(x, y) for x, y in zip(views, ref[k])), f"sample key {k}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_photometric_ops_change_the_samples_whose_draws_fired(photo_tree, backend):
    """Same crops with and without view 1's photometric ops (DALI: same graph, same seeds); the pixels differ
    only where the view key's draws say an op fired."""
    plain = next(iter(_loader(photo_tree, backend, [ViewConfig(), ViewConfig(size=16)])))
    photo = next(iter(_loader(photo_tree, backend, TWO)))
    assert torch.equal(plain.images, photo.images)
    changed = (plain.more_views[0] != photo.more_views[0]).flatten(1).any(1)
    params = P.Photometric(PHOTO).params(view_key(photo.keys, 1))
    fired = params["jitter"] | params["grayscale"] | params["blur"] | params["solarize"]
    # only the samples whose draws fired change (one that fired may not: solarizing a dark crop, say)
    assert not (changed & ~fired).any() and changed.sum() >= fired.sum() // 2 > 0


# ------------------------------------------------------------------------------------------------ view keys

def test_view_key_wraps_like_int64():
    keys = [0, 1, 2**63 - 1, sample_seed(5, 2, 7), *(sample_seed(0, 0, i) for i in range(50))]
    for v in range(4):
        want = [((k + v * VIEW_STRIDE + 2**63) % 2**64) - 2**63 for k in keys]
        assert [view_key(k, v) for k in keys] == want
        assert view_key(torch.tensor(keys), v).tolist() == want
    assert view_key(12345, 0) == 12345 and view_key_offset(0) == 0


def test_the_decoders_key_offset_is_view_key(photo_files):
    """fv_sample_view with key_add = view_key_offset(v) decodes the box the sampler draws from view_key(key, v)."""
    from pipelines import cropdecode as cd

    aug = cd.CropAug()
    args, epoch = aug.as_array(), np.array([2], dtype=np.int64)
    for index, path in enumerate(photo_files[:6]):
        data = np.fromfile(path, dtype=np.uint8)
        w, h = cd.jpeg_size(data)
        for v in (1, 3):
            out = np.empty((24, 24, 3), dtype=np.uint8)
            rc = cd.SAMPLE_VIEW(data.ctypes.data, data.size, 0, 0, 0, 7, epoch.ctypes.data, index, 1, args.ctypes.data,
                                aug.filter_mode, 0, out.ctypes.data, 24, 24, 0, view_key_offset(v))
            assert rc == 0
            params = cd.rrc_params(view_key(sample_seed(7, 2, index), v), h, w, aug)
            np.testing.assert_array_equal(out, cd.decode_box(data, params, (24, 24))[0])


def test_views_do_not_share_crop_draws():
    """The crop sampler walks its key in steps of splitmix64's increment 0x9E37...: a view step equal to it would
    make view 1's draws view 0's shifted by one (view 1 flips exactly when view 0 resizes bilinear). With
    VIEW_STRIDE the views' draws are unrelated."""
    from pipelines import cropdecode as cd

    aug = cd.CropAug()
    keys = [sample_seed(0, 0, i) for i in range(4000)]

    def coupling(step):
        v0 = np.array([cd.rrc_params(k, 375, 500, aug) for k in keys])
        v1 = np.array([cd.rrc_params((k + step) % 2**64, 375, 500, aug) for k in keys])
        return abs(np.corrcoef(v0[:, 4], v1[:, 5])[0, 1]), abs(np.corrcoef(v0[:, 2] * v0[:, 3], v1[:, 2] * v1[:, 3])[0, 1])

    assert coupling(0x9E3779B97F4A7C15)[0] > 0.99  # the trap this stride avoids: flip = filter draw, exactly
    flip_filter, areas = coupling(VIEW_STRIDE)
    assert flip_filter < 4 / math.sqrt(len(keys)) and areas < 4 / math.sqrt(len(keys))


def test_draws_are_splitmix64_of_the_view_key():
    """The vectorised int64 hash equals a plain-Python uint64 splitmix64 (logical shifts, wrapping products)."""
    m = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    keys = [0, 1, -1, 2**62 + 5, -(2**63), *(view_key(sample_seed(1, 0, i), 3) for i in range(20))]
    u = P.uniforms(torch.tensor(keys), len(P.DRAWS))
    for i, k in enumerate(keys):
        state = mix((k & m) ^ 0x5851F42D4C957F2D)
        want = [(mix((state + (j + 1) * 0x9E3779B97F4A7C15) & m) >> 11) / 2**53 for j in range(len(P.DRAWS))]
        assert u[i].tolist() == want


# ------------------------------------------------------------------------------------ photometric vs torchvision

@pytest.fixture(scope="module")
def photos01(photo_files):
    """4 real photographs, 48 x 40 crops, float in [0, 1] (torchvision's float convention)."""
    from PIL import Image

    out = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))[:40, :48].copy()) for p in photo_files[:4]]
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.parametrize("op,ref,factors", [
    (P.brightness, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.4]),
    (P.contrast, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.4]),
    (P.saturation, TF.adjust_saturation, [0.0, 0.8, 1.0, 1.2]),
    (P.hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.05, 0.1, 0.5]),
])
def test_jitter_ops_are_torchvisions(photos01, op, ref, factors):
    x = photos01
    for f in factors:
        ours = op(x * 255.0, torch.full((len(x),), f)) / 255.0
        torch.testing.assert_close(ours, ref(x, f), atol=2e-6, rtol=0, msg=f"{op.__name__}({f})")
    # per-sample factors: each sample gets its own
    fs = torch.tensor(factors[: len(x)] + [factors[0]] * max(0, len(x) - len(factors)))
    ours = op(x * 255.0, fs) / 255.0
    for i in range(len(x)):
        torch.testing.assert_close(ours[i], ref(x[i], float(fs[i])), atol=2e-6, rtol=0)


def test_grayscale_solarize_and_blur_are_torchvisions(photos01):
    x = photos01
    torch.testing.assert_close(P.grayscale(x * 255) / 255, TF.rgb_to_grayscale(x, num_output_channels=3),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(P.solarize(x * 255) / 255, TF.solarize(x, 128 / 255), atol=1e-6, rtol=0)
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = P.gaussian_blur(x * 255, sigmas, radius=6) / 255  # kernel 2 ceil(3 x 2.0) + 1 = 13
    for i, s in enumerate(sigmas.tolist()):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [13, 13], [s, s]), atol=2e-6, rtol=0)


def test_jitter_runs_each_samples_own_order(photos01):
    """Jitter = the sample's four ops in its drawn order, each with its drawn factor (torchvision's ColorJitter
    with those parameters)."""
    view = ViewConfig(color_jitter=1.0)
    stage = P.Photometric(view)
    keys = sample_seeds(0, 0, range(len(photos01)))
    p = stage.params(keys)
    out = stage((photos01 * 255).clone(), keys) / 255
    refs = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    names = ("brightness", "contrast", "saturation", "hue")
    for i in range(len(photos01)):
        y = photos01[i]
        for o in p["order"][i].tolist():
            y = refs[o](y, float(p[names[o]][i]))
        torch.testing.assert_close(out[i], y, atol=1e-5, rtol=0)
    assert len({tuple(o) for o in p["order"].tolist()}) > 1


def test_normalised_host_batches_cannot_skip_a_views_photometric_ops():
    norm = DeviceNormalize((0.5,) * 3, (0.5,) * 3, "cpu", photometric=[None, P.Photometric(PHOTO)])
    with pytest.raises(TypeError, match="view 1 has photometric ops"):
        norm(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2), torch.zeros(2, dtype=torch.int64),
             more_views=[HostView(torch.zeros(2, 3, 4, 4), normalized=True)])


# ------------------------------------------------------------------------------------------------ config errors

@pytest.mark.parametrize("bad,match", [
    (dict(color_jitter=1.5), r"views\[1\]\.color_jitter: a probability in \[0, 1\]"),
    (dict(grayscale=-0.1), r"views\[1\]\.grayscale"),
    (dict(blur=2), r"views\[1\]\.blur: a probability"),
    (dict(solarize=1.01), r"views\[1\]\.solarize"),
    (dict(hflip=1.5), r"views\[1\]\.hflip"),
    (dict(hue=0.6), r"views\[1\]\.hue: a shift in \[0, 0\.5\]"),
    (dict(brightness=-0.4), r"views\[1\]\.brightness: a jitter strength >= 0"),
    (dict(saturation=-1), r"views\[1\]\.saturation"),
    (dict(blur_sigma=(0.0, 2.0)), r"views\[1\]\.blur_sigma: need 0 < low <= high"),
    (dict(blur_sigma=(2.0, 1.0)), r"views\[1\]\.blur_sigma"),
    (dict(blur_sigma=3.0), r"views\[1\]\.blur_sigma: a \(low, high\) pair"),
    (dict(crop_scale=(0.5, 0.2)), r"views\[1\]\.crop_scale: need 0 < low <= high <= 1"),
    (dict(crop_ratio=(0.0, 1.0)), r"views\[1\]\.crop_ratio"),
    (dict(size=-16), r"views\[1\]\.size: a side in pixels >= 0"),
    (dict(size=6, blur=0.5), r"views\[1\]\.blur_sigma: the blur kernel's radius ceil\(3 x 2\.0\) = 6 must be below "
                             r"the view's size, 6 px"),
])
def test_bad_view_values_name_the_field(fmnist_small, bad, match):
    cfg = PipelineConfig(path=str(fmnist_small / "train"), workers=0)
    with pytest.raises(ValueError, match=match):
        build_loader(cfg, img_size=28, batch_size=8, views=[ViewConfig(), ViewConfig(**bad)])


def test_views_must_be_a_non_empty_list_of_view_configs(fmnist_small):
    cfg = PipelineConfig(path=str(fmnist_small / "train"), workers=0)
    for views, match in (([], "views: a non-empty sequence"), (ViewConfig(), "views: a non-empty sequence"),
                         ([ViewConfig(), {"size": 16}], r"views\[1\]: a ViewConfig is expected, got dict")):
        with pytest.raises(ValueError, match=match):
            build_loader(cfg, img_size=28, batch_size=8, views=views)
    assert not ViewConfig().photometric and ViewConfig(solarize=0.1).photometric and ViewConfig(blur=1).photometric
