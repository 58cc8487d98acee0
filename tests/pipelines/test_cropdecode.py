"""The crop decoder (pipelines/_cropdecode.c through pipelines/cropdecode.py) against the reference it stands in
for: PIL's decode, torchvision's RandomResizedCrop sampling, Pillow's antialiased resampling."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import cropdecode as cd
from pipelines.base import DecodeError, DeviceNormalize, sample_seed


@pytest.fixture(scope="module")
def jpegs(photo_files):
    """(bytes, PIL-decoded pixels) of real photographs (baseline 4:2:0, as photo_tree writes them)."""
    out = []
    for path in photo_files[:24]:
        data = path.read_bytes()
        out.append((data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
    return out


def test_c_sampler_is_its_python_twin():
    aug = cd.CropAug()
    narrow = cd.CropAug(scale=(0.9, 1.0), ratio=(3.0, 4.0))  # 10 failed attempts on a square: the fallback
    for key in [0, 1, 2**62 + 12345, *(sample_seed(3, e, i) for e in range(3) for i in range(50))]:
        for h, w in ((375, 500), (500, 333), (64, 64), (7, 900)):
            assert cd.rrc_params(key, h, w, aug) == cd.rrc_params_c(key, h, w, aug)
            assert cd.rrc_params(key, h, w, narrow) == cd.rrc_params_c(key, h, w, narrow)
    assert cd.rrc_params_c(5, 100, 100, narrow)[:4] == (33, 0, 33, 100)  # torchvision: w = W, h = W / 3, centred


def test_the_filter_and_flip_draws_follow_their_settings():
    keys = [sample_seed(0, 0, i) for i in range(2000)]
    both = np.array([cd.rrc_params_c(k, 300, 400, cd.CropAug())[4:] for k in keys])
    assert 0.45 < both[:, 0].mean() < 0.55 and 0.45 < both[:, 1].mean() < 0.55  # bicubic share, flip rate
    fixed = cd.CropAug(hflip=0.0, interpolation="bicubic")
    assert {cd.rrc_params_c(k, 300, 400, fixed)[4:] for k in keys[:200]} == {(1, 0)}


def test_decoding_a_box_is_exactly_the_full_decode_cropped(jpegs):
    """Rows skipped above, never read below, columns cut to iMCUs: the pixels of the box are those of a full
    decode (same libjpeg-turbo, same IDCT), including the box's edge columns."""
    rng = np.random.default_rng(0)
    for data, full in jpegs:
        H, W = full.shape[:2]
        for _ in range(4):
            h, w = int(rng.integers(8, H // 2)), int(rng.integers(8, W // 2))
            top, left = int(rng.integers(0, H - h)), int(rng.integers(0, W - w))
            out, denom = cd.decode_box(data, (top, left, h, w, 0, 0), (h, w))  # same size, bilinear: identity
            assert denom == 1
            np.testing.assert_array_equal(out, full[top:top + h, left:left + w])


@pytest.mark.parametrize("simd", ["avx2", "sse4.1", "c"])
@pytest.mark.parametrize("filt", [0, 1])
@pytest.mark.parametrize("size", [(64, 64), (45, 63)])
def test_resampling_is_pillows(jpegs, filt, size, simd):
    """Crop then resize as torchvision does on a PIL image: Pillow's bilinear / bicubic (a = -0.5), antialiased
    when shrinking. Fixed-point Pillow vs float here: off by one level at most for bilinear; bicubic's negative
    lobes amplify the intermediate rounding a little."""
    aug = cd.CropAug(interpolation="bicubic" if filt else "bilinear", scale=(0.3, 1.0))
    for i, (data, full) in enumerate(jpegs):
        p = cd.rrc_params(sample_seed(1, 0, i), *full.shape[:2], aug)
        top, left, h, w, f, flip = p
        ref = Image.fromarray(full).crop((left, top, left + w, top + h)).resize(size[::-1], (Image.BILINEAR, Image.BICUBIC)[f])
        ref = np.asarray(ref)[:, ::-1] if flip else np.asarray(ref)
        with cd.simd(simd):  # the CPU may lack the instruction set: then the next one down runs
            out = cd.resample_box(full, p, size)
            jp, denom = cd.decode_box(data, p, size)
        diff = np.abs(out.astype(int) - ref.astype(int))
        assert diff.mean() < 0.25 and diff.max() <= (1 if filt == 0 else 8), (p, diff.max(), diff.mean())
        # the JPEG path gives the same pixels whenever it decodes at full scale
        if denom == 1:
            np.testing.assert_array_equal(jp, out)


def test_a_box_much_larger_than_the_output_decodes_at_a_dct_scale(jpegs):
    data, full = max(jpegs, key=lambda j: j[1].size)
    H, W = full.shape[:2]
    p = (0, 0, H, W, 0, 0)
    for size, want in (((H, W), 1), ((H // 2, W // 2), 2), ((H // 4, W // 4), 4), ((H // 8, W // 8), 8), ((8, 8), 8)):
        out, denom = cd.decode_box(data, p, size)
        assert denom == want
        ref = np.asarray(Image.fromarray(full).resize(size[::-1], Image.BILINEAR))
        assert np.abs(out.astype(int) - ref.astype(int)).mean() < 6.0  # a different low-pass (block averages), the same picture


def test_bad_jpegs_are_errors_never_grey_images(jpegs):
    data = jpegs[0][0]
    w, h = cd.jpeg_size(data)
    box = (0, 0, h, w, 0, 0)
    for bad, why in ((data[: len(data) // 2], "Premature end|Corrupt"), (b"\xff\xd8" + b"\x00" * 100, "JPEG"),
                     (b"not a jpeg at all", "Not a JPEG")):
        with pytest.raises(DecodeError, match=f"cannot decode image x.jpg: .*({why})"):
            cd.decode_box(bad, box, (32, 32), name="x.jpg")
        assert cd.why_not_decodable(bad)
    assert cd.why_not_decodable(data) == ""
    with pytest.raises(DecodeError, match="crop box outside the image"):
        cd.decode_box(data, (0, 0, h + 1, w, 0, 0), (32, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalising_in_the_decoder_equals_device_normalize(jpegs, dtype):
    """What a CPU run gets from the decoder threads is bit for bit what DeviceNormalize makes of the uint8
    pixels (same fp32 arithmetic, same round-to-nearest-even to bf16)."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    args = cd.CropAug().as_array(mean, std)
    epoch = np.zeros(1, dtype=np.int64)
    kind = cd.OUT_KINDS["float32" if dtype == torch.float32 else "bfloat16"]
    for i, (data, _) in enumerate(jpegs[:6]):
        buf = np.frombuffer(data, dtype=np.uint8)
        u8 = torch.empty((1, 48, 48, 3), dtype=torch.uint8)
        norm = torch.empty((1, 3, 48, 48), dtype=dtype)
        for out, k in ((u8, 0), (norm, kind)):
            rc = cd.SAMPLE(buf.ctypes.data, buf.size, 0, 0, 0, 7, epoch.ctypes.data, i, 1, args.ctypes.data, 2, k,
                           out.data_ptr(), 48, 48, 0)
            assert rc == 0
        ref = DeviceNormalize(mean, std, "cpu", dtype)(u8, torch.zeros(1), nhwc=True).images
        assert torch.equal(norm, ref)


def test_a_dct_scaled_box_lands_where_the_full_resolution_box_does(tmp_path):
    """At 1/8, scaled pixel k covers source pixels [8k, 8k + 8): the box maps by exactly 1/8, wherever the image
    width rounds (2100 / 8 = 262.5 -> 263 scaled pixels). A vertical step edge lands where Pillow puts it."""
    W, H, edge = 2100, 1900, 1717
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[:, edge:] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=100, subsampling=0)
    box = (50, 300, 1800, 1800, 0, 0)
    out, denom = cd.decode_box(buf.getvalue(), box, (224, 224))
    assert denom == 8
    ref = np.asarray(Image.fromarray(img).crop((300, 50, 2100, 1850)).resize((224, 224), Image.BILINEAR))

    def crossing(row):  # sub-pixel position of the 50 % level
        v = row.astype(float)
        i = int(np.argmax(v >= 127.5))
        return i - 1 + (127.5 - v[i - 1]) / (v[i] - v[i - 1])

    assert abs(crossing(out[112, :, 0]) - crossing(ref[112, :, 0])) < 0.15
