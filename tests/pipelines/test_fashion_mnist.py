import gzip

import numpy as np
import pytest
from PIL import Image

from pipelines.fashion_mnist import CLASSES, DEFAULT_SOURCE, load_split, read_idx, write_fashion_mnist


def test_tree_matches_the_idx_files(fmnist_small):
    images, labels = load_split("test")
    assert images.shape == (10_000, 28, 28) and labels.max() == 9
    root = fmnist_small / "test"
    assert sorted(p.name for p in root.iterdir()) == list(CLASSES)
    assert all(len(list((root / c).iterdir())) == 100 for c in CLASSES)
    # the first kept test image of class k is the first image with label k
    for k in (0, 9):
        first = sorted((root / CLASSES[k]).iterdir())[0]
        np.testing.assert_array_equal(np.asarray(Image.open(first)), images[np.flatnonzero(labels == k)[0]])


def test_rerun_is_a_no_op(fmnist_small):
    marker = fmnist_small / "fashion_mnist.json"
    stamp = marker.stat().st_mtime_ns
    counts = write_fashion_mnist(fmnist_small, per_class=100)
    assert counts["train"] == {c: 100 for c in CLASSES}
    assert marker.stat().st_mtime_ns == stamp


def test_missing_package_names_the_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist"):
        write_fashion_mnist(tmp_path / "out", source=tmp_path / "nothing")


def test_truncated_idx_is_an_error(tmp_path):
    src = DEFAULT_SOURCE / "t10k-labels-idx1-ubyte.gz"
    cut = tmp_path / "cut-idx1-ubyte.gz"
    cut.write_bytes(gzip.compress(gzip.decompress(src.read_bytes())[:500]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(cut)
