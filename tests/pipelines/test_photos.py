"""`fastvit data photos`: real photographs from installed packages as an ImageNet-like tree, deterministic,
with its sources named; a clear error where there are none."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from pipelines.folder import scan_folder
from pipelines.photos import MANIFEST, PACKAGE_PHOTOS, PhotoSettings, find_sources, write_photos


def test_setup_installs_every_package_photograph():
    found = find_sources()
    assert len(found) == len(PACKAGE_PHOTOS), "make setup installs scikit-image, scikit-learn and matplotlib"
    for src in found:
        with Image.open(src.path) as im:
            assert min(im.size) >= 256, src  # photographs, not icons


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.JPEG"))}


def test_cli_writes_an_imagenet_like_tree(tmp_path):
    out = tmp_path / "p"
    r = subprocess.run([sys.executable, "-m", "fastvit_pt.cli", "data", "photos", str(out), "--n", "40", "--max-side",
                        "160", "--classes", "4", "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "FASTVIT_PHOTOS"})  # the packages' photos only
    assert r.returncode == 0, r.stderr
    assert "wrote 40 images in 4 classes" in r.stdout and "scikit-image" in r.stdout
    samples, classes = scan_folder(out)  # the manifest is hidden: a loader passes over it
    assert len(samples) == 40 and classes == [f"n{c:08d}" for c in range(4)]
    m = json.loads((out / MANIFEST).read_text())
    n_src = len(m["sources"])
    assert m["originals"] == n_src and m["derived"] == 40 - n_src
    assert all(s["licence"] for s in m["sources"])
    for row in m["files"]:
        with Image.open(out / row["file"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and not im.info.get("progressive")
            assert max(im.size) <= 160 and list(im.size) == row["size"]
            if row["crop"] is not None:  # derived crops are scaled to the long side exactly
                assert max(im.size) == 160
            assert im.layer[0][1:3] == (2, 2)  # luma sampled 2x2 against chroma: 4:2:0


def test_deterministic_in_the_seed_whatever_the_worker_count(tmp_path):
    s = PhotoSettings(n=24, max_side=96, classes=3, seed=5)
    write_photos(tmp_path / "a", s, workers=1)
    write_photos(tmp_path / "b", s, workers=2)
    write_photos(tmp_path / "c", PhotoSettings(n=24, max_side=96, classes=3, seed=6))
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 24
    assert a != c


def test_extra_folders_join_the_sources(tmp_path):
    extra = tmp_path / "mine"
    extra.mkdir()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(extra / "green.jpg")
    found = find_sources([extra])
    assert found[-1].path == str(extra / "green.jpg") and len(found) == len(PACKAGE_PHOTOS) + 1
    only = find_sources([extra], packages=False)
    write_photos(tmp_path / "out", PhotoSettings(n=3, classes=1), only)
    with Image.open(tmp_path / "out" / "n00000000" / "img_000000.JPEG") as im:
        assert im.size == (300, 200)


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sample photographs found.*pip install scikit-image"):
        write_photos(tmp_path / "none", PhotoSettings(n=3), sources=[])
    with pytest.raises(FileNotFoundError, match="photograph folder not found: .*nope"):
        find_sources([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg, .jpeg or .png"):
        find_sources([tmp_path / "empty"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="is not empty"):
        write_photos(tmp_path / "full", PhotoSettings(n=2))
    with pytest.raises(ValueError, match="--max-side"):
        PhotoSettings(max_side=4).validate()
