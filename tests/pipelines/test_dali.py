"""The DALI backend's own promises, on its CPU operators (device_id=None): one pipeline for every epoch, epochs
that do not depend on what ran before, only decoding reported as DecodeError, ROI-decoding crops."""
import shutil

import pytest
import torch

from pipelines import PipelineConfig, build_loader
from pipelines.base import DecodeError, sample_seeds

dali_loader = pytest.importorskip("pipelines.dali_loader")


def _loader(root, randaugment="", **kw):
    cfg = PipelineConfig(backend="dali", path=str(root), workers=2, interpolation="random", randaugment=randaugment)
    args = dict(img_size=32, batch_size=8, seed=1)
    args.update(kw)
    return build_loader(cfg, **args)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("randaugment", ["", "rand-m9-mstd0.5-inc1"])
def test_one_pipeline_serves_every_epoch_and_resume_is_bit_exact(photo_tree, randaugment):
    ran = _loader(photo_tree, randaugment)
    first = _epoch(ran, 0)
    pipe = ran._pipe
    assert pipe is not None
    second = _epoch(ran, 1)
    assert ran._pipe is pipe  # no rebuild, so no new decoders, queues or nvJPEG preallocation
    resumed = _loader(photo_tree, randaugment)
    # an epoch abandoned after one batch leaves DALI's prefetched batches behind: they must not leak
    resumed.set_epoch(0)
    next(iter(resumed))
    again = _epoch(resumed, 1)
    assert len(second) == len(again) == len(ran)
    for a, b in zip(second, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.keys, b.keys)
    assert not torch.equal(first[0].images, second[0].images)
    # and epoch 0 read again on the same pipeline is epoch 0, not the stream's continuation
    for a, b in zip(first, _epoch(ran, 0)):
        assert torch.equal(a.images, b.images)


def test_epochs_draw_fresh_augmentations_even_unshuffled(photo_tree):
    """Same files in the same order each epoch: the crops must still differ (the random streams move on)."""
    loader = _loader(photo_tree, shuffle=False)
    a, b = _epoch(loader, 0), _epoch(loader, 1)
    assert [x.labels.tolist() for x in a] == [x.labels.tolist() for x in b]
    assert all(not torch.equal(x.images, y.images) for x, y in zip(a, b))


@pytest.mark.parametrize("drop_last,sizes", [(True, [10] * 4), (False, [10] * 4 + [8])])
def test_last_batch_and_len(photo_tree, drop_last, sizes):
    loader = _loader(photo_tree, batch_size=10, drop_last=drop_last)
    loader.set_epoch(2)
    batches = list(loader)
    assert len(loader) == len(batches) and [len(b) for b in batches] == sizes
    assert torch.cat([b.keys for b in batches]).tolist() == sample_seeds(1, 2, loader.epoch_indices()[: sum(sizes)]).tolist()


def test_a_failing_copy_is_not_a_decode_error(photo_tree):
    """A CUDA out-of-memory in the device copy or normalisation is the device's error, not a bad image's."""
    loader = _loader(photo_tree)
    normalize = loader.to_device

    def out_of_memory(*_):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    loader.to_device = out_of_memory
    with pytest.raises(RuntimeError, match="CUDA out of memory") as err:
        next(iter(loader))
    assert not isinstance(err.value, DecodeError)
    # the pipeline survives it and the epoch starts over from its first batch
    pipe = loader._pipe
    loader.to_device = normalize
    assert torch.equal(next(iter(loader)).images, next(iter(_loader(photo_tree))).images)
    assert loader._pipe is pipe


def test_a_bad_file_in_a_later_batch_is_named(photo_tree, tmp_path):
    """DALI names the failing sample by its place in the batch; the loader maps it to the batch it was reading,
    with later batches already in flight (prefetch)."""
    root = tmp_path / "tree"
    shutil.copytree(photo_tree, root, symlinks=True)
    data = next(photo_tree.rglob("*.JPEG")).read_bytes()
    (root / "n00000001" / "zz_broken.jpg").write_bytes(data[: len(data) // 2])  # 33rd in path order
    loader = _loader(root, batch_size=6, shuffle=False)  # batch 5, sample #2
    with pytest.raises(DecodeError, match=r"cannot decode image .*n00000001/zz_broken\.jpg"):
        list(loader)


def test_train_graph_decodes_crops_with_image_random_crop(photo_tree):
    train, val = _loader(photo_tree), _loader(photo_tree, train=False)
    next(iter(train)), next(iter(val))
    assert b"decoders__ImageRandomCrop" in train._pipe.serialize()
    graph = val._pipe.serialize()
    assert b"decoders__Image" in graph and b"decoders__ImageRandomCrop" not in graph
    # on a GPU the same operator runs as "mixed" (nvJPEG ROI decoding), with hints sized to the data
    cfg = PipelineConfig(backend="dali")
    gpu = dali_loader._decoder_args(cfg, gpu=True, hint=(400, 300))
    assert gpu["device"] == "mixed" and (gpu["preallocate_width_hint"], gpu["preallocate_height_hint"]) == (400, 300)
    assert "preallocate_width_hint" not in dali_loader._decoder_args(cfg, gpu=False, hint=(400, 300))


def test_preallocation_hint_is_the_largest_header(photo_files):
    from PIL import Image

    sizes = [Image.open(p).size for p in photo_files]
    want = (max(w for w, _ in sizes), max(h for _, h in sizes))
    assert dali_loader._largest_header([str(p) for p in photo_files]) == want
    assert max(want) <= 400  # the fixture's long side, far from ImageNet's 5980 x 6430
