"""The picture of one inspected image: its anomaly map over it, the threshold contour, a caption.

The map is coloured (jet) on the state's display range, the calibration images' lowest map value
to as far above the threshold, so the threshold sits in the middle of the scale (green) and every
picture of a state uses one scale. Pixels whose map value is above the threshold are outlined in
white. Pictures of images under :data:`MIN_SIDE` pixels are enlarged (nearest) by a whole factor
towards it.
Written with Pillow: the same inputs give the same bytes.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

MIN_SIDE = 256
CAPTION = 14  # pixels of the caption strip under the picture
ALPHA = 0.45  # share of the heat map in the blend


@functools.lru_cache(maxsize=1)
def _jet_table() -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3]


def _jet(v: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) jet colours in [0, 1] (256 levels, as matplotlib draws them)."""
    return _jet_table()[np.round(v * 255.0).astype(np.intp)]


def contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render(image01: torch.Tensor, amap: torch.Tensor, threshold: float, display: list[float]) -> np.ndarray:
    """(3, S, S) image and (S, S) map -> (side, side, 3) uint8 picture (caption not included)."""
    img = image01.permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float64)
    m = amap.numpy().astype(np.float64)
    lo, hi = float(display[0]), float(display[1])
    heat = _jet(np.clip((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m), 0.0, 1.0))
    rgb = (1 - ALPHA) * img + ALPHA * heat
    k = max(1, MIN_SIDE // img.shape[0])
    rgb = rgb.repeat(k, axis=0).repeat(k, axis=1)
    edge = contour((m > threshold).repeat(k, axis=0).repeat(k, axis=1))
    rgb[edge] = 1.0
    return np.round(rgb * 255.0).astype(np.uint8)


def draw_overlay(path: str, image01: torch.Tensor, amap: torch.Tensor, threshold: float,
                 display: list[float], caption: str) -> str:
    """Write the picture with ``caption`` under it as a PNG at ``path`` (atomically)."""
    pic = render(image01, amap, threshold, display)
    h, w, _ = pic.shape
    canvas = Image.new("RGB", (w, h + CAPTION), (0, 0, 0))
    canvas.paste(Image.fromarray(pic), (0, 0))
    ImageDraw.Draw(canvas).text((3, h + 1), caption, fill=(255, 255, 255))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    canvas.save(tmp, format="PNG", compress_level=1)  # speed over size: written once per image
    os.replace(tmp, path)
    return path
