"""Sample checks: images and masks as they come from the sources (formats, modes, bit depths,
corrupt and truncated data), the members and metadata of a loaded sample, unreadable files."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from shards.record import BadInput, SampleRecord, check_image, check_mask, load_sample, read_inputs


# ----------------------------------------------------------------------------- image and mask checks


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr, mode).save(out, "PNG")
    return out.getvalue()


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


RNG = np.random.default_rng(0)
RGB = (RNG.random((12, 16, 3)) * 255).astype(np.uint8)
GRAY = (RNG.random((12, 16)) * 255).astype(np.uint8)


def test_rgb_and_gray_images_pass_through_unchanged():
    for data, ext, mode in [
        (png(RGB), "png", "RGB"),
        (png(GRAY), "png", "L"),
        (encoded(Image.fromarray(RGB), "JPEG", quality=90), "jpg", "RGB"),
        (encoded(Image.fromarray(RGB), "BMP"), "bmp", "RGB"),
        (encoded(Image.fromarray(RGB), "TIFF"), "tiff", "RGB"),
    ]:
        out, out_ext, w, h, got_mode, conv = check_image(data, ext)
        assert out is data and out_ext == ext and (w, h) == (16, 12) and got_mode == mode and conv is None


def test_corrupt_and_truncated_images_are_bad_inputs():
    jpg = encoded(Image.fromarray((RNG.random((64, 80, 3)) * 255).astype(np.uint8)), "JPEG", quality=90)
    good_png = png(RGB)
    flipped = bytearray(good_png)
    flipped[len(flipped) // 2] ^= 0xFF
    bmp = encoded(Image.fromarray(RGB), "BMP")
    cases = {
        "random bytes": (os.urandom(500), "png", "not a readable image"),
        "empty file": (b"", "jpg", "not a readable image"),
        "truncated jpeg": (jpg[: len(jpg) * 2 // 3], "jpg", "truncated JPEG"),
        "truncated png": (good_png[: len(good_png) // 2], "png", "corrupt or truncated image"),
        "flipped byte in png": (bytes(flipped), "png", "corrupt or truncated image"),
        "truncated bmp": (bmp[: len(bmp) // 2], "bmp", "corrupt or truncated image"),
    }
    for name, (data, ext, reason) in cases.items():
        with pytest.raises(BadInput, match=reason):
            check_image(data, ext)
            pytest.fail(name)


def test_16bit_images_convert_losslessly_or_are_refused():
    g8 = GRAY
    ok, g16 = cv2.imencode(".png", g8.astype(np.uint16) * 257)
    out, ext, w, h, mode, conv = check_image(g16.tobytes(), "png")
    assert ext == "png" and mode.startswith("I;16") and conv.endswith("->L")
    np.testing.assert_array_equal(decode(out), g8)
    # 16-bit RGB: OpenCV writes BGR; the result must be the RGB image.
    ok, c16 = cv2.imencode(".png", RGB[..., ::-1].astype(np.uint16) * 257)
    out, ext, _, _, mode, conv = check_image(c16.tobytes(), "png")
    assert mode == "RGB;16" and conv == "RGB;16->RGB"
    np.testing.assert_array_equal(decode(out), RGB)
    # Real 16-bit data cannot become 8-bit without loss.
    ok, deep = cv2.imencode(".png", (g8.astype(np.uint16) * 257) + 1)
    with pytest.raises(BadInput, match="more than 8 bits"):
        check_image(deep.tobytes(), "png")


def test_alpha_palette_and_bilevel_images():
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 255, np.uint8)])
    out, ext, _, _, mode, conv = check_image(png(rgba, "RGBA"), "png")
    assert (mode, conv, ext) == ("RGBA", "RGBA->RGB", "png")
    np.testing.assert_array_equal(decode(out), RGB)
    see_through = rgba.copy()
    see_through[0, 0, 3] = 10
    with pytest.raises(BadInput, match="transparent pixels"):
        check_image(png(see_through, "RGBA"), "png")
    la = Image.fromarray(np.dstack([GRAY, np.full(GRAY.shape, 255, np.uint8)]), "LA")
    out, *_ , conv = check_image(encoded(la, "PNG"), "png")
    assert conv == "LA->L"
    np.testing.assert_array_equal(decode(out), GRAY)
    pal = Image.fromarray(RGB).quantize(16)
    expected = np.asarray(pal.convert("RGB"))
    out, *_, conv = check_image(encoded(pal, "PNG"), "png")
    assert conv == "P->RGB"
    np.testing.assert_array_equal(decode(out), expected)
    pal.info["transparency"] = 0
    with pytest.raises(BadInput, match="transparent pixels"):
        check_image(encoded(pal, "PNG", transparency=0), "png")
    bilevel = Image.fromarray(GRAY > 128)
    out, *_, conv = check_image(encoded(bilevel, "PNG"), "png")
    assert conv == "1->L"
    np.testing.assert_array_equal(decode(out), np.where(GRAY > 128, 255, 0))
    cmyk = Image.fromarray(RGB).convert("CMYK")
    with pytest.raises(BadInput, match="JPEG in mode CMYK"):
        check_image(encoded(cmyk, "JPEG"), "jpg")


def test_masks_are_binarised_to_the_image_size():
    labels = (RNG.random((12, 16)) > 0.7).astype(np.uint8)
    # 0/255 8-bit PNG: passed through unchanged.
    m255 = png(labels * 255)
    assert check_mask(m255, 16, 12) is m255
    # 0/1 (VisA style), region ids, RGB masks, 16-bit: any non-zero pixel is abnormal.
    for data in [png(labels), png(labels * 7), png(np.dstack([labels * 0, labels * 0, labels * 200])),
                 cv2.imencode(".png", labels.astype(np.uint16) * 1000)[1].tobytes(),
                 encoded(Image.fromarray(labels * 255), "BMP")]:
        out = decode(check_mask(data, 16, 12))
        np.testing.assert_array_equal(out, labels * 255)
    with pytest.raises(BadInput, match="mask size 16x12 differs from the image size 16x13"):
        check_mask(m255, 16, 13)
    with pytest.raises(BadInput, match="mask is not a readable image"):
        check_mask(b"garbage", 16, 12)
    big = png(((RNG.random((64, 64)) > 0.5) * 255).astype(np.uint8))
    with pytest.raises(BadInput, match="corrupt or truncated mask"):
        check_mask(big[: len(big) // 2], 64, 64)


def _record(tmp_path: Path, data: bytes, mask: bytes | None, ext: str = "png") -> SampleRecord:
    (tmp_path / f"img.{ext}").write_bytes(data)
    if mask is not None:
        (tmp_path / "img_mask.png").write_bytes(mask)
    return SampleRecord(
        key="s+c+test+crack+C2+img", source="s", cls="c", view="C2", split="test", role="val", label=1,
        defect="crack", path=f"c/img.{ext}", url=str(tmp_path / f"img.{ext}"), size=len(data),
        mask_path="c/img_mask.png" if mask is not None else None,
        mask_url=str(tmp_path / "img_mask.png") if mask is not None else None,
    )


def test_load_sample_members_and_metadata(tmp_path):
    data = encoded(Image.fromarray(RGB), "JPEG", quality=90)
    mask = png(((RNG.random((12, 16)) > 0.5) * 255).astype(np.uint8))
    s = load_sample(_record(tmp_path, data, mask, "jpg"))
    assert [n for n, _ in s.members] == ["s+c+test+crack+C2+img.jpg", "s+c+test+crack+C2+img.json",
                                         "s+c+test+crack+C2+img.mask.png"]
    assert s.members[0][1] == data and s.members[2][1] == mask
    meta = json.loads(s.members[1][1])
    assert meta == {
        "source": "s", "class": "c", "view": "C2", "split": "test", "role": "val", "label": 1, "defect": "crack",
        "width": 16, "height": 12, "path": "c/img.jpg", "mask_path": "c/img_mask.png",
        "sha256": hashlib.sha256(data).hexdigest(), "has_mask": True, "image_ext": "jpg", "mode": "RGB",
        "converted": None,
    }
    # An image-level-only abnormal sample: no mask member, has_mask false.
    s = load_sample(_record(tmp_path, data, None, "jpg"))
    assert len(s.members) == 2 and s.meta["has_mask"] is False
    with pytest.raises(BadInput, match="mask c/img_mask.png: mask size"):
        load_sample(_record(tmp_path, data, png(np.zeros((5, 5), np.uint8)), "jpg"))


def _read_unprivileged(path: str, q) -> None:
    if os.geteuid() == 0:  # root reads anything: drop to nobody first
        os.setgid(65534)
        os.setuid(65534)
    q.put(str(read_inputs([path])[path]))


def test_unreadable_and_looping_files_are_bad_inputs():
    d = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "locked.png")
        Path(path).write_bytes(png(RGB))
        os.chmod(path, 0)
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_read_unprivileged, args=(path, q))
        p.start()
        p.join(30)
        assert q.get(timeout=5).startswith("cannot read the file: PermissionError")
        loop = os.path.join(d, "loop.png")
        os.symlink(loop, loop)
        got = read_inputs([loop])[loop]
        assert isinstance(got, BadInput) and "cannot read the file" in str(got)
    finally:
        shutil.rmtree(d)
