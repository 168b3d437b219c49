"""The sample record, its key, and the checks an input passes before it goes into a shard.

A reader turns a dataset root into :class:`SampleRecord` objects (what to read and how to
label it). :func:`load_sample` reads one record and returns the tar members of the sample,
or raises :class:`BadInput` with the reason it goes to quarantine instead.

Checks on an image, cheap enough to keep the build close to the speed of copying bytes:
the header parses (format, size, mode); a JPEG's scan data ends with its EOI marker
(truncation); a PNG's chunks all pass their CRC and it ends with IEND; BMP and TIFF are
decoded fully. Images the loaders decode as 8-bit L or RGB are passed through unchanged.
Others are converted losslessly to PNG where the meaning is clear (palette, 1-bit, an
alpha channel that is fully opaque, 16-bit data that holds 8-bit values), and quarantined
otherwise. Masks are binarised (any non-zero pixel is abnormal) to a 0/255 PNG of the
image's size; an 8-bit 0/255 PNG mask is passed through unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from shards import storage

IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")
"""File extensions read as images (case-insensitive)."""

_EXT_NAMES = {"jpeg": "jpg", "tif": "tiff"}
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def image_ext(path: str) -> str | None:
    """The normalised lowercase image extension of ``path`` (jpg, png, bmp, tiff), or None."""
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    return _EXT_NAMES.get(ext, ext) if ext in IMAGE_EXTS else None


_KINDS = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


def file_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` is when it is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _key_part(value: str | None) -> str:
    # Every character outside [A-Za-z0-9_-] is percent-escaped, so "+" never occurs inside
    # a part and the joined key is unique for every distinct tuple of parts.
    if value is None:
        return ""
    if value == "":
        return "%"  # never produced by escaping (which always adds two hex digits)
    return _KEY_SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)


def make_key(source: str, cls: str, split: str, defect: str, view: str | None, stem: str) -> str:
    """Deterministic sample key; no dots or slashes (webdataset splits the key at the first dot)."""
    return "+".join(_key_part(p) for p in (source, cls, split, defect, view, stem))


@dataclass(frozen=True)
class Quarantined:
    """An input that is not written, with the reason."""

    path: str
    source: str
    reason: str
    cls: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "source": self.source, "class": self.cls, "reason": self.reason}


@dataclass(frozen=True)
class SampleRecord:
    """One input image and everything needed to write it (see DESIGN.md, "Data contract")."""

    key: str
    source: str
    cls: str
    view: str | None
    split: str  # the dataset's own split: train | test | validation
    role: str  # pretrain | val | eval
    label: int
    defect: str
    path: str  # relative to the source root
    url: str
    size: int
    stamp: str = ""  # what changes when the file does: mtime_ns on a local disk, the ETag on a store
    mask_path: str | None = None
    mask_url: str | None = None
    mask_size: int = 0
    mask_stamp: str = ""

    @property
    def stream(self) -> str:
        return "abnormal" if self.label else "normal"

    @property
    def has_mask(self) -> bool:
        return self.mask_url is not None

    def identity(self) -> list:
        """What a committed shard must have been written from to be reused."""
        return [self.key, self.path, self.size, self.stamp, self.mask_path, self.mask_size, self.mask_stamp,
                self.label, self.view, self.split]


@dataclass
class Sample:
    """The tar members of one sample, in writing order, and its metadata."""

    key: str
    members: list[tuple[str, bytes]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, b in self.members)


class BadInput(Exception):
    """An input that goes to quarantine; the message is the reason."""


def _read_local(path: str) -> bytes | BadInput:
    # O_NONBLOCK: opening a FIFO put in place after the listing returns at once instead of
    # waiting for a writer; fstat then refuses anything that is not a regular file.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return BadInput(f"cannot read the file: {type(e).__name__}: {e.strerror or e}")
    with open(fd, "rb") as f:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind:
            return BadInput(f"{kind}, not a regular file (not read)")
        try:
            return f.read()
        except OSError as e:
            return BadInput(f"cannot read the file: {type(e).__name__}: {e.strerror or e}")


def read_inputs(urls: list[str]) -> dict[str, bytes | BadInput]:
    """Bytes of several inputs (fetched concurrently from an object store).

    A file that cannot be read maps to a :class:`BadInput`; a store that cannot be reached
    raises StorageError (it would otherwise quarantine every input).
    """
    remote = [u for u in urls if storage.is_remote(u)]
    out: dict[str, bytes | BadInput] = {u: _read_local(u) for u in urls if not storage.is_remote(u)}
    if remote:
        for url, data in zip(remote, storage.read_many(remote)):
            out[url] = BadInput("file is missing") if isinstance(data, FileNotFoundError) else data
    return out


def _is_16bit(img: Image.Image) -> bool:
    if img.mode.startswith("I;16"):
        return True
    args = img.tile[0].args if img.tile else None
    raw = args[0] if isinstance(args, tuple) and args else args
    return isinstance(raw, str) and ";16" in raw


def _check_structure(img: Image.Image, data: bytes) -> None:
    """Cheap checks that catch truncated and corrupted files without a full decode."""
    if img.format == "JPEG":
        # EOI can only follow the scan data (0xFF in entropy-coded data is stuffed), and most
        # files end with it; some cameras append bytes after it.
        if data[-2:] != b"\xff\xd9" and data.find(b"\xff\xd9", img.fp.tell()) < 0:
            raise BadInput("truncated JPEG: the scan data has no end-of-image marker")
    elif img.format == "PNG":
        probe = Image.open(io.BytesIO(data))
        probe.verify()  # every chunk's CRC, up to IEND
    else:
        img.load()


def _from_16bit(data: bytes) -> Image.Image:
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise BadInput("16-bit image that cannot be decoded")
    if np.any(arr % 257):
        raise BadInput(
            "16-bit image with more than 8 bits of precision: the loaders read 8-bit images, so it cannot "
            "be converted without loss; convert it to 8-bit yourself"
        )
    arr = (arr // 257).astype(np.uint8)
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    if arr.shape[2] == 3:
        return Image.fromarray(arr[..., ::-1].copy(), "RGB")
    if arr.shape[2] == 4:
        return Image.fromarray(arr[..., [2, 1, 0, 3]].copy(), "RGBA")
    raise BadInput(f"16-bit image with {arr.shape[2]} channels")


def _to_l_or_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    """Lossless conversion to L or RGB, or BadInput when the meaning is not clear."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise BadInput(
                f"{mode} image with transparent pixels: what lies under them is unknown; flatten it yourself"
            )
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    if img.mode not in ("L", "RGB"):
        raise BadInput(f"image mode {mode} cannot be converted to RGB without loss")
    return img, f"{mode}->{img.mode}"


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def _open(data: bytes, what: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadInput(f"{what} is not a readable image (corrupt or not an image file)") from None
    except Image.DecompressionBombError as e:
        raise BadInput(f"{what} is too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInput(f"corrupt or truncated {what}: {type(e).__name__}: {e}") from None


def check_image(data: bytes, ext: str) -> tuple[bytes, str, int, int, str, str | None]:
    """Validate an image's bytes: (bytes to write, extension, width, height, mode, conversion).

    ``mode`` is the original PIL mode (";16" appended for 16-bit data); ``conversion`` is
    None when the original bytes are written, else what was converted (written as PNG).
    """
    img = _open(data, "image")
    try:
        width, height = img.size
        if _is_16bit(img):
            mode = img.mode if img.mode.startswith("I;16") else f"{img.mode};16"
            out, _ = _to_l_or_rgb(_from_16bit(data))
            return _png(out), "png", width, height, mode, f"{mode}->{out.mode}"
        _check_structure(img, data)
        if img.mode in ("L", "RGB"):
            return data, ext, width, height, img.mode, None
        if img.format == "JPEG":
            raise BadInput(f"JPEG in mode {img.mode} cannot be converted to RGB without loss")
        img.load()
        out, conv = _to_l_or_rgb(img)
        return _png(out), "png", width, height, img.mode, conv
    except BadInput:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInput(f"corrupt or truncated image: {type(e).__name__}: {e}") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_gray8_png(data: bytes) -> bool:
    # IHDR is the first chunk: bit depth at byte 24, colour type at byte 25 (0 = grayscale).
    return data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[24] == 8 and data[25] == 0


def check_mask(data: bytes, width: int, height: int) -> bytes:
    """A binary 0/255 mask PNG of the image's size, from the mask's bytes."""
    m = _open(data, "mask")
    if m.size != (width, height):
        raise BadInput(f"mask size {m.size[0]}x{m.size[1]} differs from the image size {width}x{height}")
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.shape[:2] != (height, width):
        raise BadInput("corrupt or truncated mask: it cannot be decoded")
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    binary = arr > 0
    if _is_gray8_png(data) and not np.any(arr[binary] != 255):
        return data
    return _png(Image.fromarray(binary.astype(np.uint8) * 255, "L"))


def load_sample(
    rec: SampleRecord, data: bytes | BadInput | None = None, mask_data: bytes | BadInput | None = None
) -> Sample:
    """Check one record (reading its files unless given); raises BadInput with the quarantine reason."""
    if data is None or (rec.mask_url is not None and mask_data is None):
        got = read_inputs([u for u in (rec.url, rec.mask_url) if u is not None])
        data = got[rec.url] if data is None else data
        mask_data = got.get(rec.mask_url) if mask_data is None else mask_data
    if isinstance(data, BadInput):
        raise data
    ext = image_ext(rec.path) or "bin"
    out, out_ext, width, height, mode, conv = check_image(data, ext)
    mask_png = None
    if rec.mask_url is not None:
        try:
            if isinstance(mask_data, BadInput):
                raise mask_data
            mask_png = check_mask(mask_data, width, height)
        except BadInput as e:
            raise BadInput(f"mask {rec.mask_path}: {e}") from None
    meta = {
        "source": rec.source,
        "class": rec.cls,
        "view": rec.view,
        "split": rec.split,
        "role": rec.role,
        "label": rec.label,
        "defect": rec.defect,
        "width": width,
        "height": height,
        "path": rec.path,
        "mask_path": rec.mask_path,
        "sha256": hashlib.sha256(data).hexdigest(),
        "has_mask": mask_png is not None,
        "image_ext": out_ext,
        "mode": mode,
        "converted": conv,
    }
    members = [(f"{rec.key}.{out_ext}", out), (f"{rec.key}.json", json.dumps(meta, sort_keys=True).encode())]
    if mask_png is not None:
        members.append((f"{rec.key}.mask.png", mask_png))
    return Sample(rec.key, members, meta)


__all__ = [
    "IMAGE_EXTS",
    "BadInput",
    "Quarantined",
    "Sample",
    "SampleRecord",
    "check_image",
    "check_mask",
    "file_kind",
    "image_ext",
    "load_sample",
    "make_key",
    "read_inputs",
]
