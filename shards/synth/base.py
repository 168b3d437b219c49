"""The user's own normal images (``--base-images DIR``): listed, read, and made into scenes,
either whole (centre-cropped to the output's aspect and resized) or cut into tiles
(``--base-mode tile``: every tile a normal image at the images' own resolution)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from shards.errors import UserError
from shards.synth.draw import F32, Scene


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
BASE_MODES = ("whole", "tile")


@dataclass(frozen=True)
class Piece:
    """One normal image made from a base image: the file and the box cut from it (None: whole)."""

    path: Path
    box: tuple[int, int, int, int] | None = None  # (x, y, width, height) in the base image


def list_base_images(base_images: str | Path) -> list[Path]:
    root = Path(base_images)
    if not root.is_dir():
        raise UserError(f"synth: --base-images {str(root)!r} is not a folder; give a folder of normal jpg/png images")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(
            f"synth: --base-images {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "put the normal images of the product directly in that folder"
        )
    return files


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError):
        raise UserError(f"synth: cannot decode base image {str(path)!r}; remove it or convert it to PNG/JPEG") from None


def tiles(files: list[Path], tile_w: int, tile_h: int) -> list[Piece]:
    """Every base image cut into a grid of tile_w x tile_h tiles (centred; the margins that do
    not fill a tile are left out), in file order, row by row."""
    pieces = []
    for path in files:
        w, h = _image_size(path)
        if w < tile_w or h < tile_h:
            raise UserError(
                f"synth: base image {str(path)!r} is {w}x{h} px, smaller than a {tile_w}x{tile_h} tile; "
                f"give --tile {min(w, round(h * tile_w / tile_h))} or less, or remove that image"
            )
        nx, ny = w // tile_w, h // tile_h
        x0, y0 = (w - nx * tile_w) // 2, (h - ny * tile_h) // 2
        pieces += [Piece(path, (x0 + i * tile_w, y0 + j * tile_h, tile_w, tile_h)) for j in range(ny) for i in range(nx)]
    return pieces


def read_rgb(path: Path) -> np.ndarray:
    """A base image as uint8 RGB (read-only; the last two are kept, so the tiles of one image decode it once)."""
    try:
        st = Path(path).stat()
    except OSError as e:
        raise UserError(f"synth: cannot read base image {str(path)!r}: {e.strerror or e}") from None
    return _decode(Path(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=2)
def _decode(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    data = np.fromfile(path, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise UserError(f"synth: cannot decode base image {str(path)!r}; remove it or convert it to PNG/JPEG")
    out = np.ascontiguousarray(img[..., ::-1])
    out.setflags(write=False)
    return out


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    interp = cv2.INTER_AREA if img.shape[1] > w else cv2.INTER_CUBIC
    return cv2.resize(img, (w, h), interpolation=interp)


def scene_from_image(rgb: np.ndarray, size: int, height: int | None = None) -> Scene:
    """A user's normal image (uint8 RGB), centre-cropped to the output's aspect and resized to
    ``size`` x ``height`` (default square)."""
    oh = height or size
    h, w = rgb.shape[:2]
    cw, ch = (w, round(w * oh / size)) if w * oh <= h * size else (round(h * size / oh), h)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    img = _resize(rgb[y0 : y0 + ch, x0 : x0 + cw], size, oh).astype(F32) / 255
    return Scene(np.clip(img, 0, 1), None, None)


def scene_from_piece(piece: Piece, size: int, height: int | None = None) -> Scene:
    """The scene of one piece: a whole base image, or one tile resized to size x height if it differs."""
    rgb = read_rgb(piece.path)
    if piece.box is None:
        return scene_from_image(rgb, size, height)
    x, y, w, h = piece.box
    oh = height or size
    crop = rgb[y : y + h, x : x + w]
    img = crop if (w, h) == (size, oh) else _resize(crop, size, oh)
    return Scene(img.astype(F32) / 255, None, None)
