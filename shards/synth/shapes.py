"""The shapes defects are drawn with: anti-aliased coverage of a thresholded field, irregular
blobs of a given area, random walks and strokes, and where on the product a defect sits.

A coverage field is 1 inside a defect, 0 outside, with a ramp at most one pixel wide at its
border; the mask of a defect is its coverage ``>= MASK_LEVEL``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from shards.synth.draw import F32, Rng, Scene, fbm, window


MASK_LEVEL = 0.25
"""Coverage at and above which a pixel belongs to the defect mask."""
MIN_CHANGE = 8.0 / 255.0
"""Smallest colour change a defect makes inside its region (so every masked pixel changes)."""


def field_cov(field: np.ndarray, thr: float) -> np.ndarray:
    """Coverage of {field > thr} with a one-pixel anti-aliased ramp (first-order distance)."""
    gy, gx = np.gradient(field)
    g = np.sqrt(gx * gx + gy * gy) + F32(1e-6)
    return np.clip((field - F32(thr)) / g + F32(0.5), 0, 1).astype(F32)


def blob(rng: Rng, cx: float, cy: float, area: float, h: int, w: int, rough: float, elong: float):
    """An irregular blob of about ``area`` pixels: (coverage, window, normalised depth, x, y)."""
    r = math.sqrt(area / math.pi)
    win, x, y = window(cx, cy, 2.2 * r * elong + 3, h, w)
    ang = rng.uniform(0, math.pi)
    c, s = F32(math.cos(ang)), F32(math.sin(ang))
    xr, yr = x * c + y * s, -x * s + y * c
    rho = np.sqrt((xr / F32(elong)) ** 2 + (yr * F32(elong)) ** 2) / F32(r)
    cell = F32(max(r * 0.5, 1.0))
    field = -rho + F32(2 * rough) * (fbm(rng, x / cell, y / cell, 2) - 0.5)
    flat = field.ravel()
    n = int(min(max(round(area), 1), flat.size - 1))
    part = np.partition(flat, [flat.size - n - 1, flat.size - n])
    thr = 0.5 * (float(part[flat.size - n - 1]) + float(part[flat.size - n]))
    depth = np.clip((field - F32(thr)) / F32(max(float(flat.max()) - thr, 1e-6)), 0, 1)
    return field_cov(field, thr), win, depth, x, y


def pick_center(rng: Rng, scene: Scene, region: float, edge: bool = False) -> tuple[float, float]:
    """A point on the product (on its outline when ``edge``) within the central ``region``."""
    h, w = scene.image.shape[:2]
    y0, y1 = int(h * (1 - region) / 2), int(h * (1 + region) / 2)
    x0, x1 = int(w * (1 - region) / 2), int(w * (1 + region) / 2)
    if scene.obj is not None:
        sub = scene.obj[y0:y1, x0:x1]
        cand = (sub > 0.05) & (sub < 0.95) if edge else sub > 0.9
        ys, xs = np.nonzero(cand)
        if len(ys) == 0:
            ys, xs = np.nonzero(sub > 0.5)
        if len(ys):
            i = rng.integers(len(ys))
            return float(xs[i] + x0), float(ys[i] + y0)
    return rng.uniform(x0, x1), rng.uniform(y0, y1)


def walk(rng: Rng, cx: float, cy: float, length: float, step: float, turn: float, drift: float) -> np.ndarray:
    """A random walk of ``length`` pixels through (cx, cy) at its middle; ``turn`` jitters, ``drift`` bends."""
    n = max(2, int(length / step) + 1)
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, drift, n)) + rng.normal(0, turn, n)
    pts = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1) * step, 0)
    return pts - pts[n // 2] + (cx, cy)


def stroke(paths: list[np.ndarray], thickness: int, h: int, w: int):
    """Anti-aliased coverage of polylines: (coverage, window)."""
    allp = np.concatenate(paths)
    m = thickness + 3
    y0, y1 = max(0, int(allp[:, 1].min()) - m), min(h, int(allp[:, 1].max()) + m + 1)
    x0, x1 = max(0, int(allp[:, 0].min()) - m), min(w, int(allp[:, 0].max()) + m + 1)
    if y1 <= y0 or x1 <= x0:
        return np.zeros((0, 0), F32), (slice(0, 0), slice(0, 0))
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    pts = [((p - (x0, y0)) * 16).round().astype(np.int32) for p in paths]
    cv2.polylines(canvas, pts, False, 255, thickness, cv2.LINE_AA, 4)
    return canvas.astype(F32) / 255, (slice(y0, y1), slice(x0, x1))


def on_product(a: np.ndarray, win, scene: Scene) -> np.ndarray:
    return a if scene.obj is None else a * scene.obj[win]


