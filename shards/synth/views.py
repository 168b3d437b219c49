"""The camera views of a Real-IAD sample: where each camera looks at the canvas, and its light.

Sizes are a side (square) or (height, width)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from shards.synth.draw import F32, Rng, illumination


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def view_homography(rng: Rng, view: int, size: int | tuple[int, int], canvas: int | tuple[int, int]) -> np.ndarray:
    """Output-to-canvas homography of camera ``view`` (0: top view C1; 1..4: tilted views)."""
    (h, w), (ch, cw) = _hw(size), _hw(canvas)
    if view == 0:
        zoom, tilt, rot, direction = rng.uniform(0.97, 1.03), 0.0, rng.uniform(-0.05, 0.05), 0.0
    else:
        zoom, tilt = rng.uniform(0.92, 1.1), rng.uniform(0.12, 0.2)
        rot = rng.uniform(-0.12, 0.12)
        direction = (view - 1) * math.pi / 2 + rng.uniform(-0.2, 0.2)
    half = np.array([w, h], float) / (2 * zoom)
    dvec = np.array([math.cos(direction), math.sin(direction)])
    pvec = np.array([-dvec[1], dvec[0]])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    along, across = corners @ dvec, corners @ pvec
    quad = (along[:, None] * dvec + (across * (1 + tilt * along))[:, None] * pvec) * half
    c, s = math.cos(rot), math.sin(rot)
    quad = quad @ np.array([[c, s], [-s, c]]) + np.array([cw, ch]) / 2 + rng.uniform(-0.03, 0.03, 2) * np.array([w, h])
    out = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    return cv2.getPerspectiveTransform(out, quad.astype(np.float32))


def warp_view(img: np.ndarray, hom: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    h, w = _hw(size)
    return cv2.warpPerspective(
        img, hom, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT101
    )


def view_light(rng: Rng, size: int | tuple[int, int]) -> np.ndarray:
    """The illumination gain of one camera view."""
    h, w = _hw(size)
    return (illumination(rng, h, w, 0.35) * F32(rng.uniform(0.85, 1.1)))[..., None]
