"""`fastvit convert` on a messy tree: what is kept, what is skipped and why, pixels, labels, determinism; the
file format held to the installed FFCV's (its writer's bytes, its Loader, and ours)."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from messy_tree import KEEP, SKIP_REASONS, build
from pipelines.beton import ConversionError, ConvertSettings, convert, manifest_path


@pytest.fixture(scope="module")
def messy(photo_files, tmp_path_factory):
    return build(photo_files, tmp_path_factory.mktemp("messy"))


def read_back(beton):
    """Every (image [H, W, 3], label) in file order, through FFCV's Reader: its metadata and allocation
    table say where each payload is; raw payloads are pixels, jpg payloads are decoded with PIL."""
    import io

    from ffcv.reader import Reader

    r = Reader(str(beton))
    sizes = {int(ptr): int(size) for ptr, size in zip(r.alloc_table["ptr"], r.alloc_table["size"])}
    blob = np.fromfile(beton, dtype=np.uint8)
    out = []
    for (mode, w, h, ptr), label in r.metadata.tolist():  # python ints: uint16 h * w * 3 overflows
        data = blob[int(ptr) : int(ptr) + sizes[int(ptr)]]
        if mode == 1:  # raw
            img = data[: h * w * 3].reshape(h, w, 3)
        else:
            img = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
        out.append((img, int(label)))
    return out


def test_messy_tree_keeps_every_decodable_image_and_names_every_skip(messy, tmp_path):
    out = tmp_path / "messy.beton"
    m = convert(messy, out, ConvertSettings(workers=2))
    assert out.is_file() and json.loads(manifest_path(out).read_text()) == m
    assert m["num_samples"] == KEEP and m["classes"] == ["n01_a", "n02_b"]
    assert sum(m["counts_per_class"].values()) == KEEP
    reasons = {x["path"].rsplit("/", 1)[-1]: x["reason"] for x in m["skipped"]}
    assert set(reasons) == set(SKIP_REASONS)
    for name, word in SKIP_REASONS.items():
        assert reasons[name].startswith(word), (name, reasons[name])
    assert m["stored"]["passthrough"] >= 6  # the ordinary baseline JPEGs keep their bytes
    assert m["settings"]["page_size"] == 8 << 20  # jpg mode: the 6000-px JPEG fits a default page
    assert not list(tmp_path.glob(".*"))  # no temporary or spill file left behind


def test_round_trip_raw_pixels_labels_and_page_size(messy, tmp_path):
    out = tmp_path / "raw.beton"
    m = convert(messy, out, ConvertSettings(mode="raw", workers=2))
    assert m["settings"]["page_size"] == 16 << 20  # the 6000 x 600 image (10.8 MB) needs a larger page
    back = read_back(out)
    assert len(back) == KEEP
    kept = sorted(p for p in messy.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[-2:])
                  and p.name not in SKIP_REASONS)
    assert len(kept) == KEEP
    for (img, label), path in zip(back, kept):
        assert label == ["n01_a", "n02_b"].index(path.parent.name)
        with Image.open(path) as im:
            if im.mode == "I;16":
                continue  # scaled 16 -> 8 bit by the converter; checked below
            want = ImageOps.exif_transpose(im)
            if want.mode in ("RGBA", "P"):
                want = Image.alpha_composite(Image.new("RGBA", want.size, "white"), want.convert("RGBA"))
            want = np.asarray(want.convert("RGB"))
        assert img.shape == want.shape, path.name
        assert np.array_equal(img, want), path.name
    rot = [img for (img, _), p in zip(back, kept) if p.name == "exif_rot.jpg"][0]
    assert rot.shape[:2] == (300, 200)  # EXIF orientation 6 applied: 300 x 200 stored as 200 wide
    g16 = [img for (img, _), p in zip(back, kept) if p.name == "gray16.png"][0]
    assert g16[0, 0].tolist() == [0, 0, 0] and g16[-1, -1].tolist() == [255, 255, 255]


def test_passthrough_stores_the_original_bytes(messy, tmp_path):
    out = tmp_path / "jpg.beton"
    convert(messy, out, ConvertSettings(workers=2))
    blob = out.read_bytes()
    plain = (messy / "n01_a" / "plain_1.jpg").read_bytes()
    assert plain in blob  # byte for byte: no decode, no second lossy step
    progressive = (messy / "n02_b" / "progressive.jpg").read_bytes()
    assert progressive not in blob  # not baseline: decoded and re-encoded
    small = tmp_path / "small.beton"
    m = convert(messy, small, ConvertSettings(workers=2, max_res=64))
    assert m["stored"]["passthrough"] == 0 and plain not in small.read_bytes()  # over --max-res: resized
    assert all(max(img.shape[:2]) <= 64 for img, _ in read_back(small))


@pytest.mark.parametrize("max_res", [None, 64])  # 64: every image decoded, area-resized and encoded
def test_same_input_same_bytes(messy, tmp_path, max_res):
    a, b = tmp_path / "a.beton", tmp_path / "b.beton"
    convert(messy, a, ConvertSettings(workers=2, max_res=max_res))
    convert(messy, b, ConvertSettings(workers=1, max_res=max_res))
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_strict_fails_and_leaves_nothing(messy, tmp_path):
    out = tmp_path / "strict.beton"
    with pytest.raises(ConversionError, match=r"(?s)--strict: 3 file\(s\).*truncated\.jpg"):
        convert(messy, out, ConvertSettings(workers=2, strict=True))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_limit_spreads_over_classes(messy, tmp_path):
    m = convert(messy, tmp_path / "lim.beton", ConvertSettings(workers=2, limit=6))
    assert all(c > 0 for c in m["counts_per_class"].values())
    with pytest.raises(FileNotFoundError, match="source folder not found"):
        convert(tmp_path / "nope", tmp_path / "x.beton")


def test_format_is_the_installed_ffcvs():
    """beton.py spells FFCV's file format out instead of importing ffcv; these are ffcv's own definitions."""
    from ffcv import types
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES

    from pipelines import beton

    assert beton._FORMAT_VERSION == types.CURRENT_VERSION
    assert beton._HEADER == types.HeaderType and beton._FIELD_DESC == types.FieldDescType
    assert beton._ALLOC == types.ALLOC_TABLE_TYPE
    assert beton._META == types.get_metadata_type([RGBImageField(), IntField()])
    assert [types.TYPE_ID_HANDLER[t] for t, _ in beton._FIELDS] == [RGBImageField, IntField]
    assert beton._IMAGE_MODES == dict(IMAGE_MODES)


@pytest.mark.parametrize("mode", ["jpg", "raw"])
def test_bytes_are_what_ffcvs_writer_writes(messy, tmp_path, mode):
    """FFCV's DatasetWriter with one worker, handed the same payloads, writes the same file byte for byte (raw:
    the 10.8 MB image arrives after smaller ones were laid out in 8 MiB pages, and 16 MiB pages are redone)."""
    import types

    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    ours = tmp_path / "ours.beton"
    m = convert(messy, ours, ConvertSettings(mode=mode, workers=2))
    r = Reader(str(ours))
    blob = np.fromfile(ours, dtype=np.uint8)
    sizes = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    samples = [((kind, w, h, blob[ptr : ptr + sizes[ptr]]), label) for (kind, w, h, ptr), label in r.metadata.tolist()]

    def copy_payload(self, destination, item, malloc):
        destination["mode"], destination["width"], destination["height"], data = item
        destination["data_ptr"], storage = malloc(data.nbytes)
        storage[:] = data

    field = RGBImageField()
    field.encode = types.MethodType(copy_payload, field)
    theirs = tmp_path / "theirs.beton"
    DatasetWriter(str(theirs), {"image": field, "label": IntField()}, page_size=m["settings"]["page_size"],
                  num_workers=1).from_indexed_dataset(samples)
    assert theirs.read_bytes() == ours.read_bytes()


def test_resized_files_open_with_ffcvs_loader_and_ours(photo_tree, tmp_path):
    import torch
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from pipelines import PipelineConfig, build_loader
    from pipelines.folder import walk_classes

    out = tmp_path / "p.beton"
    m = convert(photo_tree, out, ConvertSettings(max_res=64, workers=2))
    assert m["stored"]["jpg"] == m["num_samples"] == 48  # all over 64 px: decoded, resized, encoded
    loader = Loader(str(out), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((32, 32), 1.0)], "label": [IntDecoder()]})
    labels = []
    for images, batch_labels in loader:
        assert images.shape[1:] == (32, 32, 3) and 20 < float(np.asarray(images).mean()) < 235
        labels += batch_labels.ravel().tolist()
    assert labels == [label for _, label in walk_classes(photo_tree)[0]]
    ours = build_loader(PipelineConfig(backend="ffcv", path=str(out), workers=1), img_size=32, batch_size=16,
                        seed=0, dtype=torch.float32)
    batches = list(ours)
    assert len(batches) == 3 and batches[0].images.shape == (16, 3, 32, 32)


def test_resized_pixels_are_area_averages(messy, tmp_path):
    """max_res=64, raw pixels: each image is what a full decode + cv2 INTER_AREA gives, within rounding; the
    6000 x 600 JPEG is decoded at 1/8 scale first (libjpeg's IDCT scaling), a few levels off at most."""
    import cv2

    from pipelines.beton import _area_resize

    rng = np.random.default_rng(0)
    for h, w, th, tw in ((375, 500, 192, 256), (500, 333, 256, 170), (7, 1000, 1, 143), (64, 64, 32, 32)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        diff = _area_resize(img, (tw, th)).astype(int) - cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        assert np.abs(diff).max() <= 1, (h, w)
    out = tmp_path / "small.beton"
    convert(messy, out, ConvertSettings(mode="raw", max_res=64, workers=2))
    back = {}
    for img, label in read_back(out):
        back.setdefault(img.shape, img)
    with Image.open(messy / "n02_b" / "huge.jpg") as im:
        full = np.asarray(im.convert("RGB"))
    want = cv2.resize(full, (64, 6), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(back[(6, 64, 3)].astype(int) - want).mean() < 2
