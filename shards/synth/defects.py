"""Defects of the synthetic data, rendered with exact masks, and the plan of a class's defects.

A defect is rendered as a coverage field ``a`` (0 outside the region it touches, up to 1
inside, a one-pixel ramp at its border) and a target appearance ``T``; the defective image
is ``I + a * (T - I)``. The mask is ``a >= MASK_LEVEL``: it comes from the renderer, and
pixels outside it are changed only in the anti-aliasing ring next to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from shards.synth.draw import F32, Rng, Scene, fbm, jitter, light_dir, value_noise, window


MASK_LEVEL = 0.25
"""Coverage at and above which a pixel belongs to the defect mask."""
MIN_CHANGE = 8.0 / 255.0
"""Smallest colour change a defect makes inside its region (so every masked pixel changes)."""


@dataclass(frozen=True)
class DefectSpec:
    """One defect to render: type, target area (fraction of the output image) and contrast."""

    kind: str
    area: float
    contrast: float


DEFECT_TYPES = ("scratch", "crack", "pit", "contamination", "missing", "foreign", "deformation", "abrasion")
REALIAD_CODES = {
    "pit": "AK",
    "deformation": "BX",
    "abrasion": "CH",
    "scratch": "HS",
    "crack": "PS",
    "missing": "QS",
    "foreign": "YW",
    "contamination": "ZW",
}
"""Real-IAD's two-letter defect codes (AK pit, BX deformation, CH abrasion, HS scratch, PS damage,
QS missing parts, YW foreign objects, ZW contamination) for each defect type."""
AREA_MIN, AREA_MAX = 0.0002, 0.12
"""Defect areas are drawn log-uniformly in this range (fractions of the image area)."""
AREA_RANGE = {
    "pit": (0.0002, 0.01),
    "foreign": (0.0002, 0.02),
    "scratch": (0.0003, 0.015),
    "crack": (0.0005, 0.03),
    "contamination": (0.0005, 0.12),
    "deformation": (0.003, 0.10),
    "abrasion": (0.003, 0.12),
    "missing": (0.002, 0.12),
}
"""The areas each defect type can take: tiny pits and fibres, large stains and missing pieces."""
MIN_AREA_PX = 6


def plan_defects(rng: Rng, count: int) -> list[DefectSpec]:
    """Defects for ``count`` abnormal images of a class: areas stratified over the log range
    (so small and large ones both occur in every class), the rarest compatible type for each,
    about a third of them subtle (low contrast)."""
    u = (rng.permutation(count) + rng.random(count)) / max(count, 1)
    areas = AREA_MIN * (AREA_MAX / AREA_MIN) ** u
    used = dict.fromkeys(DEFECT_TYPES, 0)
    specs = []
    for area in areas:
        fits = [t for t in DEFECT_TYPES if AREA_RANGE[t][0] <= area <= AREA_RANGE[t][1]]
        least = min(used[t] for t in fits)
        kind = str(rng.choice([t for t in fits if used[t] == least]))
        used[kind] += 1
        contrast = rng.uniform(0.2, 0.4) if rng.random() < 0.35 else rng.uniform(0.55, 1.0)
        specs.append(DefectSpec(kind, float(area), float(contrast)))
    return specs


def _field_cov(field: np.ndarray, thr: float) -> np.ndarray:
    """Coverage of {field > thr} with a one-pixel anti-aliased ramp (first-order distance)."""
    gy, gx = np.gradient(field)
    g = np.sqrt(gx * gx + gy * gy) + F32(1e-6)
    return np.clip((field - F32(thr)) / g + F32(0.5), 0, 1).astype(F32)


def _blob(rng: Rng, cx: float, cy: float, area: float, h: int, w: int, rough: float, elong: float):
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
    return _field_cov(field, thr), win, depth, x, y


def _pick_center(rng: Rng, scene: Scene, region: float, edge: bool = False) -> tuple[float, float]:
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


def _path(rng: Rng, cx: float, cy: float, length: float, step: float, turn: float, drift: float) -> np.ndarray:
    """A random walk of ``length`` pixels through (cx, cy) at its middle; ``turn`` jitters, ``drift`` bends."""
    n = max(2, int(length / step) + 1)
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, drift, n)) + rng.normal(0, turn, n)
    pts = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1) * step, 0)
    return pts - pts[n // 2] + (cx, cy)


def _stroke(paths: list[np.ndarray], thickness: int, h: int, w: int):
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


def _on_product(a: np.ndarray, win, scene: Scene) -> np.ndarray:
    return a if scene.obj is None else a * scene.obj[win]


def _scratch(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    scale = max(h, w) / 256
    t = max(1, round(rng.uniform(1.0, 2.5) * scale))
    total = area / (t + 1)
    n = max(1, math.ceil(total / (0.6 * max(h, w))))
    cx, cy = _pick_center(rng, scene, region)
    base = _path(rng, cx, cy, total / n, 3 * scale, 0.02, 0.05)
    normal = np.array([-(base[-1, 1] - base[0, 1]), base[-1, 0] - base[0, 0]])
    normal /= np.linalg.norm(normal) + 1e-9
    paths = [base + normal * (k - (n - 1) / 2) * 3 * (t + 1) for k in range(n)]
    a, win = _stroke(paths, t, h, w)
    img = scene.image[win]
    tone = 0.95 if rng.random() < 0.6 else 0.08
    target = img + F32(c) * (F32(tone) - img)
    return _on_product(a, win, scene), target, win


def _crack(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    scale = max(h, w) / 256
    t = max(1, round(rng.uniform(1.0, 2.0) * scale))
    total = area / (t + 1)
    cx, cy = _pick_center(rng, scene, region)
    main = _path(rng, cx, cy, total * 0.7, 2.5 * scale, 0.6, 0.08)
    k = rng.integers(len(main))
    branch = _path(rng, 0, 0, total * 0.3, 2.5 * scale, 0.6, 0.1)
    branch = branch - branch[0] + main[k]
    a, win = _stroke([main, branch], t, h, w)
    img = scene.image[win]
    target = img + F32(c) * (img * F32(0.12) - img)
    return _on_product(a, win, scene), target, win


def _pit(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    cx, cy = _pick_center(rng, scene, region)
    a, win, depth, x, y = _blob(rng, cx, cy, area, h, w, 0.08, rng.uniform(1.0, 1.3))
    light = light_dir(rng)
    rho = np.sqrt(x * x + y * y) + F32(1e-6)
    facing = np.clip((x * light[0] + y * light[1]) / rho, 0, 1)
    img = scene.image[win]
    dark = img * (1 - F32(c) * (F32(0.45) + F32(0.35) * depth))[..., None]
    target = dark + (F32(c) * F32(0.35) * facing * (1 - depth))[..., None]
    return _on_product(a, win, scene), np.clip(target, 0, 1), win


def _contamination(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    cx, cy = _pick_center(rng, scene, region)
    a, win, depth, x, y = _blob(rng, cx, cy, area, h, w, 0.45, rng.uniform(1.0, 2.0))
    stains = [(0.25, 0.17, 0.09), (0.06, 0.06, 0.06), (0.70, 0.62, 0.30), (0.85, 0.85, 0.82)]
    colour = jitter(rng, stains[rng.integers(len(stains))], 0.05)
    cell = F32(max(math.sqrt(area) * 0.3, 1.0))
    opacity = F32(c) * (0.55 + 0.45 * value_noise(rng, x / cell, y / cell))
    img = scene.image[win]
    target = img + (colour - img) * opacity[..., None]
    return _on_product(a, win, scene), target, win


def _missing(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    on_edge = scene.obj is not None
    cx, cy = _pick_center(rng, scene, region, edge=on_edge)
    a, win, depth, x, y = _blob(rng, cx, cy, area * (1.8 if on_edge else 1.0), h, w, 0.25, rng.uniform(1.0, 1.8))
    if scene.background is not None:
        target = scene.background[win]
    else:
        cell = F32(2.0)
        backing = F32(rng.uniform(0.05, 0.12)) * (0.8 + 0.4 * value_noise(rng, x / cell, y / cell))
        target = np.repeat(backing[..., None], 3, -1) * (0.6 + 0.4 * (1 - depth))[..., None]
    return _on_product(a, win, scene), target.astype(F32), win


def _foreign(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    scale = max(h, w) / 256
    cx, cy = _pick_center(rng, scene, region)
    hue = rng.uniform(0, 180)
    hsv = np.uint8([[[hue, rng.uniform(150, 255), rng.uniform(90, 230)]]])
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(F32) / 255
    if rng.random() < 0.2:
        colour = np.full(3, rng.uniform(0.03, 0.15), F32)
    if rng.random() < 0.5:  # a fibre or hair lying on the product
        t = max(1, round(scale))
        a, win = _stroke([_path(rng, cx, cy, area / (t + 1), 2.5 * scale, 0.05, 0.12)], t, h, w)
        img = scene.image[win]
        return a, img + F32(0.5 + 0.5 * c) * (colour - img), win
    a, win, depth, x, y = _blob(rng, cx, cy, area, h, w, 0.4, rng.uniform(1.0, 1.6))
    img = scene.image[win]
    particle = colour * (0.65 + 0.35 * depth)[..., None]
    return a, img + F32(0.5 + 0.5 * c) * (particle - img), win


def _deformation(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    cx, cy = _pick_center(rng, scene, region)
    a, win, depth, x, y = _blob(rng, cx, cy, area, h, w, 0.1, rng.uniform(1.0, 1.6))
    bump = depth * depth * (3 - 2 * depth)
    k = F32(0.45 * c) * (1 if rng.random() < 0.5 else -1)
    mx = (x * (1 - k * bump) + F32(cx)).astype(F32)
    my = (y * (1 - k * bump) + F32(cy)).astype(F32)
    warped = cv2.remap(scene.image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    r = math.sqrt(area / math.pi)
    gy, gx = np.gradient(bump * F32(r))
    light = light_dir(rng)
    shade = 1 + F32(0.35 * c) * np.sign(k) * np.clip(gx * light[0] + gy * light[1], -1, 1)
    return _on_product(a, win, scene), np.clip(warped * shade[..., None], 0, 1), win


def _abrasion(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    cx, cy = _pick_center(rng, scene, region)
    a, win, depth, x, y = _blob(rng, cx, cy, area, h, w, 0.35, rng.uniform(1.2, 2.5))
    img = scene.image[win]
    sigma = rng.uniform(1.0, 2.5) * max(h, w) / 256
    blurred = cv2.GaussianBlur(img, (0, 0), sigma)
    ang = rng.uniform(0, math.pi)
    u = x * F32(math.cos(ang)) + y * F32(math.sin(ang))
    v = -x * F32(math.sin(ang)) + y * F32(math.cos(ang))
    streak = value_noise(rng, u / F32(max(math.sqrt(area) * 0.5, 2.0)), v / F32(0.8)) - 0.5
    target = blurred * F32(1 + 0.25 * c) + (F32(0.15 * c) * streak)[..., None]
    return _on_product(a, win, scene), np.clip(target, 0, 1), win


_DEFECTS = {
    "scratch": _scratch,
    "crack": _crack,
    "pit": _pit,
    "contamination": _contamination,
    "missing": _missing,
    "foreign": _foreign,
    "deformation": _deformation,
    "abrasion": _abrasion,
}


def apply_defect(scene: Scene, spec: DefectSpec, rng: Rng, ref_size: int, region: float) -> tuple[np.ndarray, np.ndarray]:
    """Render a defect into the scene: (defective image, coverage field a in [0, 1]).

    The image changes only where ``a > 0``: the mask ``a >= MASK_LEVEL`` and a ring at most one
    pixel wide around it; by at least ``MIN_CHANGE`` (before weighting by ``a``) wherever ``a > 0``.
    ``spec.area`` is a fraction of ``ref_size**2``.
    """
    h, w = scene.image.shape[:2]
    area = max(float(MIN_AREA_PX), spec.area * ref_size * ref_size)
    a, target, win = _DEFECTS[spec.kind](rng, scene, area, spec.contrast, region)
    out = scene.image.copy()
    cov = np.zeros((h, w), F32)
    if a.size == 0:
        return out, cov
    ring = cv2.dilate((a >= MASK_LEVEL).astype(np.uint8), np.ones((3, 3), np.uint8))
    a = a * ring  # the anti-aliasing ring is at most one pixel wide
    img = out[win]
    d = np.clip(target, 0, 1) - img
    weak = np.abs(d).max(-1) < MIN_CHANGE
    if weak.any():
        sign = np.where(img.mean(-1) > 0.5, F32(-1), F32(1))
        d[weak] = (sign[weak] * F32(MIN_CHANGE))[:, None]
    out[win] = img + a[..., None] * d
    cov[win] = a
    return out, cov
