"""The reference pipeline on real photographs: the Batch contract, shards, determinism, bad files."""
import shutil

import pytest
import torch

from pipelines import PipelineConfig, build_loader
from pipelines.base import Batch, DecodeError, shard_indices, sample_seed


def _loader(root, **kw):
    cfg = PipelineConfig(path=str(root), workers=kw.pop("workers", 0))
    args = dict(img_size=64, batch_size=8, seed=1, device="cpu", dtype=torch.float32)
    args.update(kw)
    return build_loader(cfg, **args)


def test_batch_contract_on_real_photos(photo_tree):
    loader = _loader(photo_tree, dtype=torch.bfloat16)
    assert loader.classes == ["class0", "class1", "class2"]
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


def test_eval_transform_is_deterministic_center_crop(photo_tree):
    a = next(iter(_loader(photo_tree, train=False, seed=1)))
    b = next(iter(_loader(photo_tree, train=False, seed=2)))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)


def test_augmentation_is_a_function_of_seed_epoch_index(photo_tree):
    """Same stream whatever the worker count; a new epoch reshuffles and re-augments."""
    l0 = _loader(photo_tree, workers=0)
    l2 = _loader(photo_tree, workers=2)
    for epoch in (0, 3):
        l0.set_epoch(epoch)
        l2.set_epoch(epoch)
        for a, b in zip(l0, l2):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    l0.set_epoch(0)
    e0 = next(iter(l0)).images
    l0.set_epoch(1)
    assert not torch.equal(e0, next(iter(l0)).images)
    assert sample_seed(0, 0, 1) != sample_seed(0, 1, 0) != sample_seed(1, 0, 0)


@pytest.mark.parametrize("n,world", [(59, 2), (100, 4), (7, 3)])
def test_shards_are_disjoint_equal_and_cover(n, world):
    shards = [shard_indices(n, r, world, seed=5, epoch=2, shuffle=True) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    flat = torch.cat(shards).tolist()
    assert len(flat) == len(set(flat)) == n - n % world
    again = [shard_indices(n, r, world, seed=5, epoch=3, shuffle=True) for r in range(world)]
    assert any(not torch.equal(a, b) for a, b in zip(shards, again))  # reshuffled per epoch


def test_ranks_see_disjoint_samples(photo_tree):
    seen = []
    for rank in range(2):
        loader = _loader(photo_tree, rank=rank, world_size=2, batch_size=4, train=False)
        assert len(loader) == (loader.num_samples // 2) // 4
        seen.append(set(loader.sampler.__iter__()))
    assert not (seen[0] & seen[1])


def test_corrupt_image_names_the_file(photo_tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(photo_tree, root, symlinks=True)
    bad = root / "class1" / "broken.jpg"
    bad.write_bytes(next(photo_tree.rglob("*.jpg")).read_bytes()[:200])
    loader = _loader(root, batch_size=64, drop_last=False)
    with pytest.raises(DecodeError, match=r"cannot decode image .*broken\.jpg"):
        list(loader)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data folder not found: .*absent"):
        _loader(tmp_path / "absent")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        _loader(tmp_path / "empty")


def test_in_process_loading_leaves_the_global_rng_alone(photo_tree):
    """workers=0 runs the per-sample reseed in the training process: it must not move torch's global RNG."""
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    next(iter(_loader(photo_tree, workers=0)))
    assert torch.equal(torch.rand(3), want)
