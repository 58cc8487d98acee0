"""Every backend on real photographs: the Batch contract, shards, determinism, bad files.
DALI runs for real, on its CPU operators (device_id=None)."""
import shutil

import pytest
import torch

from pipelines import PipelineConfig, build_loader
from pipelines.base import Batch, DecodeError, sample_seed, sample_seeds, shard_indices

BACKENDS = ["torchvision", "ffcv", "dali", "turbo"]
_BETONS = {}


def _source(root, backend):
    """ffcv reads a .beton of the same tree (converted once per tree, raw pixels: no second JPEG loss)."""
    if backend != "ffcv":
        return root
    if root not in _BETONS:
        from pipelines.beton import ConvertSettings, convert

        out = root.parent / f"{root.name}.beton"
        convert(root, out, ConvertSettings(workers=2))
        _BETONS[root] = out
    return _BETONS[root]


def _loader(root, backend="torchvision", **kw):
    cfg = PipelineConfig(backend=backend, path=str(_source(root, backend)), interpolation=kw.pop("interpolation", "random"),
                         workers=kw.pop("workers", 0 if backend == "torchvision" else 2), randaugment=kw.pop("randaugment", ""))
    args = dict(img_size=64, batch_size=8, seed=1, device="cpu", dtype=torch.float32)
    args.update(kw)
    return build_loader(cfg, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_contract_on_real_photos(photo_tree, backend):
    loader = _loader(photo_tree, backend, dtype=torch.bfloat16, interpolation="bilinear")
    assert loader.classes == ["n00000000", "n00000001", "n00000002"]
    assert len(loader) == loader.num_samples // 8
    batches = list(loader)
    assert len(batches) == len(loader)
    b = batches[0]
    assert isinstance(b, Batch) and len(b) == 8
    assert b.images.shape == (8, 3, 64, 64) and b.images.dtype == torch.bfloat16
    assert b.labels.dtype == torch.int64 and set(b.labels.tolist()) <= {0, 1, 2}
    # normalised with ImageNet statistics: the full 0..255 range maps to about [-2.1, 2.6]
    x = b.images.float()
    assert -2.2 < x.min() < -0.5 and 1.0 < x.max() < 2.7 and abs(x.mean()) < 1.0
    # what was read is what epoch_indices says, in that order
    want = [label for _, label in _samples(photo_tree)]
    assert b.labels.tolist() == [want[i] for i in loader.epoch_indices()[:8]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sample_carries_its_key(photo_tree, backend):
    """Batch.keys = sample_seed(seed, epoch, index) for the samples read, in order, on any rank count: the
    per-sample randomness (MAE's masks) then follows the sample, not the rank or the batch it landed in."""
    for world, rank in ((1, 0), (2, 1)):
        loader = _loader(photo_tree, backend, world_size=world, rank=rank)
        loader.set_epoch(2)
        idx = loader.epoch_indices()
        keys = torch.cat([b.keys for b in loader])
        assert keys.dtype == torch.int64
        assert keys.tolist() == sample_seeds(1, 2, idx[: len(keys)]).tolist()
        assert keys.tolist()[:3] == [sample_seed(1, 2, i) for i in idx[:3]]


def _samples(root):
    from pipelines.folder import scan_folder

    return scan_folder(root)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_is_deterministic_center_crop(photo_tree, backend):
    a = next(iter(_loader(photo_tree, backend, train=False, seed=1)))
    b = next(iter(_loader(photo_tree, backend, train=False, seed=2)))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def _eval_by_key(root, backend, crop_pct):
    cfg = PipelineConfig(backend=backend, path=str(_source(root, backend)), workers=0 if backend == "torchvision" else 2,
                         crop_pct=crop_pct)
    b = next(iter(build_loader(cfg, img_size=64, batch_size=8, seed=1, device="cpu", dtype=torch.float32, train=False)))
    return {k: img for k, img in zip(b.keys.tolist(), b.images)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_crop_follows_crop_pct(photo_tree, backend):
    """data.crop_pct=1.0 scores the whole image (the short side), 0.875 its centre: each backend's crop is closer to
    torchvision's at the same crop_pct than at the other (their filters differ, their boxes must not)."""
    got = _eval_by_key(photo_tree, backend, 1.0)
    whole, centre = _eval_by_key(photo_tree, "torchvision", 1.0), _eval_by_key(photo_tree, "torchvision", 0.875)
    keys = sorted(set(got) & set(whole))
    assert len(keys) == 8
    err_same = sum((got[k] - whole[k]).abs().mean().item() for k in keys)
    err_other = sum((got[k] - centre[k]).abs().mean().item() for k in keys)
    assert err_same < 0.5 * err_other, (err_same, err_other)


def test_crop_pct_is_checked():
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"data.crop_pct: .* in \(0, 1\], got"):
            PipelineConfig(crop_pct=bad).validate()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_is_a_function_of_seed_and_epoch(photo_tree, backend):
    a, b = _loader(photo_tree, backend), _loader(photo_tree, backend)
    for loader in (a, b):
        loader.set_epoch(3)
    assert a.epoch_indices() == b.epoch_indices()
    for x, y in zip(a, b):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.images, y.images)
    a.set_epoch(4)
    assert a.epoch_indices() != b.epoch_indices()
    assert not torch.equal(next(iter(a)).images, next(iter(b)).images)


def test_torchvision_stream_ignores_worker_count(photo_tree):
    l0 = _loader(photo_tree, workers=0)
    l2 = _loader(photo_tree, workers=2)
    for epoch in (0, 3):
        l0.set_epoch(epoch)
        l2.set_epoch(epoch)
        for a, b in zip(l0, l2):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert sample_seed(0, 0, 1) != sample_seed(0, 1, 0) != sample_seed(1, 0, 0)


@pytest.mark.parametrize("n,world", [(59, 2), (100, 4), (7, 3)])
def test_shards_are_disjoint_equal_and_cover(n, world):
    shards = [shard_indices(n, r, world, seed=5, epoch=2, shuffle=True) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    flat = torch.cat(shards).tolist()
    assert len(flat) == len(set(flat)) == n - n % world
    again = [shard_indices(n, r, world, seed=5, epoch=3, shuffle=True) for r in range(world)]
    assert any(not torch.equal(a, b) for a, b in zip(shards, again))  # reshuffled per epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_read_disjoint_equal_shards(photo_tree, backend):
    loaders = [_loader(photo_tree, backend, rank=r, world_size=2, batch_size=4) for r in range(2)]
    idx = [set(l.epoch_indices()) for l in loaders]
    assert not (idx[0] & idx[1]) and len(idx[0]) == len(idx[1]) == loaders[0].num_samples // 2
    assert [len(list(l)) for l in loaders] == [len(loaders[0])] * 2 == [(loaders[0].num_samples // 2) // 4] * 2


@pytest.mark.parametrize("backend", ["torchvision", "dali", "turbo"])  # ffcv: see the .beton test below
def test_corrupt_image_names_the_file(photo_tree, tmp_path, backend):
    root = tmp_path / "tree"
    shutil.copytree(photo_tree, root, symlinks=True)
    bad = root / "n00000001" / "broken.jpg"
    data = next(photo_tree.rglob("*.JPEG")).read_bytes()
    # cut in the entropy-coded data, as an interrupted copy leaves it. (DALI 2.4.0 cannot name a file cut
    # inside its JPEG header: its pipeline dies, and under pytest the process segfaults; see dali_loader.py)
    bad.write_bytes(data[: len(data) // 2])
    loader = _loader(root, backend, batch_size=64, drop_last=False)
    with pytest.raises(DecodeError, match=r"cannot decode image .*broken\.jpg"):
        list(loader)


def test_corrupt_jpeg_inside_a_beton_names_the_sample(photo_tree, tmp_path):
    """The converter checks every JPEG it keeps; damage after conversion (a bad disk, a bad copy) must still be an
    error naming the sample, never a grey or black image (FFCV's own decoder ignores libjpeg's errors)."""
    from ffcv.reader import Reader

    beton = tmp_path / "data.beton"
    shutil.copy(_source(photo_tree, "ffcv"), beton)
    shutil.copy(str(_source(photo_tree, "ffcv")) + ".json", str(beton) + ".json")
    reader = Reader(str(beton))
    victim = 5
    ptr = int(reader.metadata["f0"][victim]["data_ptr"])
    size = int(reader.alloc_table[reader.alloc_table["ptr"] == ptr]["size"][0])
    with open(beton, "r+b") as f:  # an end-of-image marker half way through the entropy-coded data
        f.seek(ptr + size // 2)
        f.write(b"\xff\xd9" + bytes(size // 2 - 2))
    label = int(reader.metadata["f1"][victim])
    cfg = PipelineConfig(backend="ffcv", path=str(beton), workers=2)
    loader = build_loader(cfg, img_size=64, batch_size=64, drop_last=False, seed=1)
    with pytest.raises(DecodeError, match=rf"cannot decode image: sample {victim} \(class n0000000{label}\) of "
                                          rf".*data\.beton: .*(Premature end|Corrupt)"):
        list(loader)


def test_stock_ffcv_decoder_still_serves_batches(photo_tree):
    """data.ffcv_decoder=stock (FFCV's own decoder, the benchmark reference) keeps the Batch contract."""
    loader = build_loader(PipelineConfig(backend="ffcv", path=str(_source(photo_tree, "ffcv")), workers=2,
                                         ffcv_decoder="stock", interpolation="bilinear"),
                          img_size=64, batch_size=8, seed=1)
    b = next(iter(loader))
    assert b.images.shape == (8, 3, 64, 64) and b.images.is_contiguous() and b.keys is not None
    with pytest.raises(ValueError, match="data.ffcv_decoder: unknown decoder 'fast'"):
        PipelineConfig(backend="ffcv", ffcv_decoder="fast").validate()


def test_a_sample_gets_the_same_crop_on_turbo_and_ffcv(photo_tree):
    """Box, filter and flip come from the sample's key in the same C code; the .beton kept the JPEGs' bytes."""
    kw = dict(img_size=64, batch_size=8, seed=4, dtype=torch.float32)
    a = build_loader(PipelineConfig(backend="turbo", path=str(photo_tree), workers=2), **kw)
    b = build_loader(PipelineConfig(backend="ffcv", path=str(_source(photo_tree, "ffcv")), workers=2), **kw)
    for loader in (a, b):
        loader.set_epoch(2)
    for x, y in zip(a, b):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.images, y.images)


def test_turbo_reads_what_is_not_a_plain_jpeg(photo_tree, tmp_path):
    """A PNG and a CMYK JPEG in the tree (ImageNet has both) go through PIL, then the same crop code."""
    from PIL import Image

    root = tmp_path / "tree"
    shutil.copytree(photo_tree, root, symlinks=True)
    src = Image.open(next(photo_tree.rglob("*.JPEG"))).convert("RGB")
    src.save(root / "n00000000" / "zz_png.png")
    src.convert("CMYK").save(root / "n00000000" / "zz_cmyk.jpg", quality=95)
    loader = _loader(root, "turbo", batch_size=64, drop_last=False, shuffle=False)
    images = torch.cat([b.images for b in loader])
    assert images.shape[0] == loader.num_samples and torch.isfinite(images).all()


def test_in_process_loading_leaves_the_global_rng_alone(photo_tree):
    """workers=0 runs the per-sample reseed in the training process: it must not move the global RNGs."""
    import random

    import numpy as np

    def draw():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    for seed_all in (lambda: (torch.manual_seed(123), random.seed(123), np.random.seed(123)),):
        seed_all()
        want = draw()
        seed_all()
        next(iter(_loader(photo_tree, workers=0, randaugment="rand-m9")))
        assert draw() == want


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data folder not found: .*absent"):
        _loader(tmp_path / "absent")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        _loader(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"reads a \.beton file.*fastvit convert"):
        build_loader(PipelineConfig(backend="ffcv", path=str(tmp_path)), img_size=64, batch_size=8)
    (tmp_path / "hidden" / "cls").mkdir(parents=True)
    (tmp_path / "hidden" / "cls" / ".DS_Store.jpg").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no images found"):
        _loader(tmp_path / "hidden")


def test_a_batch_owns_its_memory():
    """Backends may reuse their output buffers (FFCV does): the Batch must not alias them."""
    from pipelines.base import DeviceNormalize

    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([1, 2], dtype=torch.int64)
    b = DeviceNormalize((0.5,) * 3, (0.5,) * 3, "cpu")(images, labels)
    images.fill_(255)
    labels.fill_(7)
    assert b.labels.tolist() == [1, 2] and b.images.max().item() == -1.0


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_randaugment_changes_pixels_and_stays_seeded(photo_tree, backend):
    plain = next(iter(_loader(photo_tree, backend, seed=3)))
    ra = [next(iter(_loader(photo_tree, backend, seed=3, randaugment="rand-m10-mstd0.5-inc1"))) for _ in range(2)]
    assert torch.equal(ra[0].labels, plain.labels)
    assert not torch.equal(ra[0].images, plain.images)  # same crops, then RandAugment
    assert torch.equal(ra[0].images, ra[1].images)  # and still a function of the seed


def test_randaugment_spec_errors(photo_tree):
    from pipelines.config import parse_randaugment

    assert parse_randaugment("rand-m10-mstd0.5-inc1") == (2, 10) and parse_randaugment("rand-n3-m7") == (3, 7)
    with pytest.raises(ValueError, match="expected a timm spec"):
        _loader(photo_tree, randaugment="augmix-m5")
    with pytest.raises(ValueError, match="FFCV has no RandAugment"):
        _loader(photo_tree, "ffcv", randaugment="rand-m9", interpolation="bilinear")


def test_ffcv_leaves_torch_threads_alone(photo_tree):
    """FFCV sets torch's thread count on import and per epoch; training must keep its cores."""
    n = torch.get_num_threads()
    loader = _loader(photo_tree, "ffcv", workers=1, interpolation="bilinear")
    next(iter(loader))
    assert torch.get_num_threads() == n


def test_randaugment_at_magnitude_10_survives_posterize_to_zero_bits():
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which Pillow >= 11 refuses; our transform keeps
    PIL's old meaning (a black image) instead of failing a sample now and then."""
    import random

    import numpy as np
    from PIL import Image

    from pipelines.config import PipelineConfig
    from pipelines.torchvision_loader import _posterize, train_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    assert np.asarray(_posterize(img, 0)).max() == 0 and np.asarray(_posterize(img, 8)).tolist() == np.asarray(img).tolist()
    t = train_transform(PipelineConfig(randaugment="rand-m10-n3-mstd0.5-inc1"), 28)
    for seed in range(300):  # posterize at magnitude >= 10 comes up in about 1 draw in 10
        torch.manual_seed(seed)
        random.seed(seed)
        assert t(img).shape == (3, 28, 28)


def test_ffcv_ring_slots_go_to_the_device_borrowed_and_channels_last(photo_tree, monkeypatch):
    """When the batch leaves the host (here: fp16 on the CPU stands in for a GPU's uint8 path), the crop decoder
    writes uint8 channels-last into FFCV's ring of batch slots: DeviceNormalize gets them as borrowed (on CUDA:
    the copy is waited for before FFCV may refill the slot) and transposes them itself (no host-side copy)."""
    from pipelines.base import DeviceNormalize

    calls = []
    real = DeviceNormalize.__call__

    def spy(self, images, labels, keys=None, **kw):
        calls.append((images.shape, images.dtype, kw))
        return real(self, images, labels, keys, **kw)

    monkeypatch.setattr(DeviceNormalize, "__call__", spy)
    half = next(iter(_loader(photo_tree, "ffcv", dtype=torch.float16)))
    shape, dtype, kw = calls[-1]
    assert shape == (8, 64, 64, 3) and dtype == torch.uint8 and kw == {"nhwc": True, "borrowed": True}
    full = next(iter(_loader(photo_tree, "ffcv", dtype=torch.float32)))  # normalised in the decoder threads
    assert calls[-1][2] == {"normalized": True}
    assert half.images.shape == full.images.shape and half.images.is_contiguous()
    assert torch.allclose(half.images.float(), full.images, atol=2e-3)


def test_backend_for_a_path():
    """One rule for evaluation, k-NN and reconstructions: a .beton through ffcv; a folder through the run's own
    backend where that reads folders, else the torchvision reference."""
    from pipelines import backend_for

    assert backend_for("/d/val.beton", "turbo") == "ffcv" and backend_for("/d/val.beton") == "ffcv"
    assert [backend_for("/d/val", b) for b in ("torchvision", "dali", "turbo", "ffcv")] == [
        "torchvision", "dali", "turbo", "torchvision"]
