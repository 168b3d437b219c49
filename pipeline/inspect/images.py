"""The images of an inspection: finding them under the paths a user gives, and decoding them.

A path that is a folder contributes every image file below it (recursively, by extension:
:data:`shards.record.IMAGE_EXTS`, any case), in sorted order; a path that is a file is an input
whatever its name. A path that does not exist, and a file that does not decode, stay inputs: they
are reported with the reason, never dropped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from shards.record import IMAGE_EXTS


@dataclass(frozen=True)
class Input:
    """One input: its path and, when it cannot be scored, why."""

    path: str
    error: str | None = None


def is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS if "." in name else False


def _walk(folder: str) -> tuple[list[str], int]:
    """Image files below ``folder`` (sorted) and the number of other files there."""
    found, other = [], 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if is_image_name(name):
                found.append(os.path.join(root, name))
            else:
                other += 1
    return found, other


def find_inputs(paths: list[str]) -> tuple[list[Input], int]:
    """The inputs named by ``paths`` (files, folders), in order, and how many non-image files the
    folders held (not inputs)."""
    inputs: list[Input] = []
    ignored = 0
    for p in paths:
        if os.path.isdir(p):
            files, other = _walk(p)
            inputs += [Input(f) for f in files]
            ignored += other
        elif os.path.isfile(p):
            inputs.append(Input(p))
        else:
            inputs.append(Input(p, "no such file or folder"))
    return inputs, ignored


def find_images(folder: str) -> list[str]:
    """Image files below ``folder``, sorted."""
    return _walk(folder)[0]


def decode_bytes(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> float (3, size, size) in [0, 1], as every stage sees images
    (:func:`pipeline.transforms.image_to_tensor`). Raises on data that does not decode."""
    from pipeline.transforms import decode_image, image_to_tensor

    return image_to_tensor(decode_image(data), size)


def _reason(e: BaseException) -> str:
    """Why data does not decode, the same words every time (no object addresses)."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "cannot decode: not an image in a format Pillow reads (unknown or corrupt header)"
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(e).strip().replace("\n", " "))
    return f"cannot decode: {type(e).__name__}{': ' + text[:200] if text else ''}"


def load(path: str, size: int) -> tuple[torch.Tensor | None, str | None]:
    """(image tensor, None), or (None, the reason it cannot be read)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read: {e.strerror or type(e).__name__}"
    return load_bytes(data, size)


def load_bytes(data: bytes, size: int) -> tuple[torch.Tensor | None, str | None]:
    """(image tensor, None), or (None, why ``data`` does not decode)."""
    if not data:
        return None, "empty file"
    try:
        return decode_bytes(data, size), None
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        return None, _reason(e)
