"""Per-level tensors in safetensors files: the one naming of levels, and the header.

Every file of the pipeline that holds one tensor per backbone level (a reference-bank group,
the centers, an exported projector's centers) names them ``level0``, ``level1``, ... (the
naming of the export format, so that every exported folder keeps loading).
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO, TypeVar

from torch import Tensor

T = TypeVar("T")

FORMAT = 2
"""The layout of the reference-bank and centers files, part of what they are keyed by
(:mod:`pipeline.paths`): 2 names levels ``level<i>``; files of 1 (``level_<i>``) lie at other
URLs and are never read."""


def level_name(i: int) -> str:
    """The tensor name of level ``i`` (0-based)."""
    return f"level{i}"


def by_name(levels: list[Tensor]) -> dict[str, Tensor]:
    """``{level0: levels[0], level1: levels[1], ...}``, as safetensors stores them."""
    return {level_name(i): t for i, t in enumerate(levels)}


def in_order(tensors: dict[str, T], n: int | None = None) -> list[T]:
    """The first ``n`` levels (default: all) of a file's tensors or header entries, level 0 first."""
    return [tensors[level_name(i)] for i in range(len(tensors) if n is None else n)]


def read_header(f: BinaryIO) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensor entries) of a safetensors stream, without its data.

    The header is a little-endian u64 length, then that many bytes of JSON: the tensor entries
    (dtype, shape, offsets) by name and the string-to-string ``__metadata__``.
    """
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    return header.pop("__metadata__", {}), header
