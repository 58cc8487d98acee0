"""A class-folder tree with the files real ImageNet and user folders contain, built from real photographs
(the `photo_files` fixture)."""
from pathlib import Path

import numpy as np
from PIL import Image

# decodable files (class, name) -> what the converter must keep; and the files it must skip, with a reason word
KEEP = 17
SKIP_REASONS = {"truncated.jpg": "not a decodable image", "empty.jpg": "empty file", "notes.txt": "not an image",
                ".hidden.jpg": "hidden file", ".cache": "hidden folder"}


def build(photos: list, root: Path) -> Path:
    if len(photos) < 6:
        raise ValueError(f"messy_tree.build needs 6 photographs, got {len(photos)}")
    a, b = root / "n01_a", root / "n02_b"
    a.mkdir(parents=True)
    b.mkdir()
    src = [Image.open(p).convert("RGB") for p in photos[:6]]
    for i, im in enumerate(src):  # 6 ordinary baseline JPEGs
        im.save((a if i % 2 else b) / f"plain_{i}.jpg", quality=92)
    base = src[0]
    base.convert("CMYK").save(a / "cmyk.jpg", quality=90)
    base.convert("L").save(a / "gray.jpg", quality=90)
    base.save(a / "png_named.JPEG", format="PNG")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(a / "rgba.png")
    base.convert("P").save(a / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    base.resize((300, 200)).save(b / "exif_rot.jpg", exif=exif.tobytes(), quality=90)
    base.save(b / "progressive.jpg", progressive=True, quality=90)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(b / "one_px.png")
    base.resize((6000, 600)).save(b / "huge.jpg", quality=85)  # 10.8 MB as raw pixels: more than one 8 MiB page
    base.save(b / "Ünïcödé_猫.jpg", quality=90)
    Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)).save(b / "gray16.png")
    data = (a / "plain_1.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (a / "empty.jpg").write_bytes(b"")
    (b / "notes.txt").write_text("not an image\n")
    base.save(a / ".hidden.jpg")
    (b / ".cache").mkdir()
    base.save(b / ".cache" / "thumb.jpg")
    return root
