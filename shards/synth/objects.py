"""The object classes of the synthetic data: a product placed on a backdrop, casting a shadow.

Each renderer takes (rng, height, width, feature scale) and returns a :class:`Scene` with
the product's coverage and the backdrop seen through a missing piece; :data:`OBJECTS`
names them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from shards.synth.draw import (
    F32,
    Rng,
    Scene,
    backdrop,
    blend,
    coverage,
    design_rng,
    grid,
    jitter,
    light_dir,
    rotated,
    shading,
    upsample,
    value_noise,
    window,
)


def _shadow(alpha: np.ndarray, size: int, strength: float) -> np.ndarray:
    """The soft shadow a product casts below and right of itself: a gain in [1 - strength, 1]."""
    h, w = alpha.shape
    small = cv2.resize(alpha, (max(2, w // 4), max(2, h // 4)), interpolation=cv2.INTER_AREA)
    off = size / 400
    m = np.float32([[1, 0, off], [0, 1, off]])
    shifted = cv2.warpAffine(small, m, (small.shape[1], small.shape[0]))
    return 1 - F32(strength) * upsample(cv2.GaussianBlur(shifted, (0, 0), max(0.5, size / 320)), h, w)


def _place(obj_rgb: np.ndarray, alpha: np.ndarray, bg: np.ndarray, size: int) -> Scene:
    behind = bg * _shadow(alpha, size, 0.35)[..., None]
    img = behind + (obj_rgb - behind) * alpha[..., None]
    return Scene(img.astype(F32), alpha.astype(F32), bg)


def _pose(rng: Rng, h: int, w: int, s: int, shift: float, angle: tuple[float, float]) -> tuple[float, float, float]:
    """Centre and rotation of a product: near the image centre, shifted by up to ``shift * s``."""
    return (w / 2 + rng.uniform(-shift, shift) * s, h / 2 + rng.uniform(-shift, shift) * s, rng.uniform(*angle))


def _metal_colour(rng: Rng, name: str) -> np.ndarray:
    return jitter(rng, design_rng(name).choice([(0.70, 0.71, 0.74), (0.78, 0.64, 0.36)]), 0.04)


def _screw(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.06, (0, 2 * math.pi))
    a, b = rotated(h, w, ang, cx, cy)
    length = F32(s * 0.5 * rng.uniform(0.97, 1.03))
    r = F32(s * 0.045 * rng.uniform(0.97, 1.03))
    head_r, head_l = F32(s * 0.085), F32(s * 0.07)
    a = a + F32(head_l / 2)
    tip = np.clip((length / 2 - a) / (F32(2.5) * r), 0.05, 1)
    r_eff = r * tip
    sdf_shaft = np.maximum(np.abs(b) - r_eff, np.maximum(-(a + length / 2), a - length / 2))
    ha = a + length / 2 + head_l / 2
    sdf_head = np.maximum(np.abs(b) - head_r, np.abs(ha) - head_l / 2)
    alpha = coverage(np.minimum(sdf_shaft, sdf_head))
    pitch = F32(s * 0.028)
    thread = 0.5 + 0.5 * np.sin(F32(2 * math.pi) * (a + F32(0.35) * b) / pitch)
    hs = r_eff * np.sqrt(np.clip(1 - (b / r_eff) ** 2, 0, 1)) * (0.8 + 0.2 * thread)
    hh = head_r * F32(0.5) * np.sqrt(np.clip(1 - (b / head_r) ** 2, 0, 1)) * (np.abs(b) > F32(s * 0.012))
    height = np.where(sdf_head < sdf_shaft, hh, hs) * alpha
    diff, spec = shading(height, light_dir(rng))
    col = _metal_colour(rng, "synth_screw") * (0.25 + 0.75 * diff)[..., None] + F32(0.5) * spec[..., None]
    return _place(col, alpha, backdrop(rng, h, w, (0.86, 0.86, 0.84), 0.06), s)


def _hexagon_sdf(x: np.ndarray, y: np.ndarray, inradius: float) -> np.ndarray:
    kx, ky, kz = F32(-0.8660254), F32(0.5), F32(0.57735027)
    px, py = np.abs(x), np.abs(y)
    d = np.minimum(kx * px + ky * py, 0)
    px, py = px - 2 * d * kx, py - 2 * d * ky
    px = px - np.clip(px, -kz * inradius, kz * inradius)
    py = py - F32(inradius)
    return np.sqrt(px * px + py * py) * np.sign(py)


def _nut(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.05, (0, math.pi / 3))
    x, y = rotated(h, w, ang, cx, cy)
    ri = F32(s * 0.27 * rng.uniform(0.98, 1.02))
    hole = F32(ri * 0.5 * rng.uniform(0.97, 1.03))
    rho = np.sqrt(x * x + y * y)
    sdf_out = _hexagon_sdf(x, y, ri)
    sdf = np.maximum(sdf_out, hole - rho)
    alpha = coverage(sdf)
    bevel = F32(s * 0.03)
    height = np.clip(-sdf_out / bevel, 0, 1) * np.clip((rho - hole) / bevel, 0, 1) * bevel
    height += F32(0.15) * bevel * np.sin(F32(2 * math.pi) * rho / F32(s * 0.012)) * (rho < hole + bevel)
    diff, spec = shading(height * alpha, light_dir(rng))
    col = _metal_colour(rng, "synth_nut") * (0.3 + 0.7 * diff)[..., None] + F32(0.35) * spec[..., None]
    return _place(col, alpha, backdrop(rng, h, w, (0.18, 0.18, 0.20), 0.2), s)


def _bottle(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, _ = _pose(rng, h, w, s, 0.03, (0, 0))
    yy, xx = grid(h, w)
    x, y = xx - F32(cx), yy - F32(cy)
    radius = F32(s * 0.42 * rng.uniform(0.98, 1.02))
    rho = np.sqrt(x * x + y * y) / radius
    theta = np.arctan2(y, x)
    alpha = coverage((rho - 1) * radius)
    glass = jitter(rng, design_rng("synth_bottle").choice([(0.30, 0.20, 0.10), (0.12, 0.28, 0.14)]), 0.05)
    wall = np.clip((rho - 0.72) / 0.28, 0, 1)
    lip = np.exp(-(((rho - 0.62) / 0.07) ** 2))
    ang_l = rng.uniform(0, 2 * math.pi)
    highlight = np.exp(-(((rho - 0.84) / 0.05) ** 2)) * np.clip(np.cos(theta - F32(ang_l)), 0, 1) ** 4
    ripple = 0.06 * np.sin(rho * F32(55.0) + F32(rng.uniform(0, 6.3)))
    val = 0.25 + 0.5 * wall + 0.9 * lip * (0.7 + 0.3 * np.cos(theta - F32(ang_l))) + ripple
    inner = np.clip((0.5 - rho) / 0.5, 0, 1)
    col = glass * (val * (1 - 0.6 * inner))[..., None] + F32(0.7) * highlight[..., None]
    return _place(col, alpha, backdrop(rng, h, w, (0.04, 0.04, 0.04), 0.3), s)


def _pill(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.05, (-0.1, 0.1))
    a, b = rotated(h, w, ang, cx, cy)
    half = F32(s * 0.31 * rng.uniform(0.98, 1.02))
    r = F32(s * 0.13 * rng.uniform(0.98, 1.02))
    da = np.maximum(np.abs(a) - (half - r), 0)
    d = np.sqrt(da * da + b * b)
    alpha = coverage(d - r)
    height = np.sqrt(np.clip(r * r - d * d, 0, None))
    diff, spec = shading(height, light_dir(rng))
    d_rng = design_rng("synth_pill")
    pair = d_rng.choice([((0.85, 0.25, 0.15), (0.92, 0.90, 0.86)), ((0.95, 0.60, 0.15), (0.95, 0.60, 0.15))])
    c1, c2 = jitter(rng, pair[0], 0.03), jitter(rng, pair[1], 0.03)
    col = np.where((a < 0)[..., None], c1, c2)
    seam = 1 - F32(0.35) * np.exp(-((a / F32(s * 0.006)) ** 2))
    col = col * ((0.35 + 0.65 * diff) * seam)[..., None] + F32(0.45) * spec[..., None]
    return _place(col, alpha, backdrop(rng, h, w, (0.10, 0.10, 0.11), 0.2), s)


@lru_cache(maxsize=2)
def _pcb_layout(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The board's fixed artwork (colour, height) at a given size, drawn once."""
    d = design_rng("synth_pcb")
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = (38, 92, 40)  # solder mask, RGB
    height = np.zeros((size, size), np.uint8)
    sc = size / 256
    for _ in range(26):
        x0, y0 = d.integers(10, 246, 2)
        pts = [(x0, y0)]
        for _ in range(d.integers(1, 4)):
            x, y = pts[-1]
            if d.random() < 0.5:
                x = int(np.clip(x + d.integers(-90, 90), 8, 248))
            else:
                y = int(np.clip(y + d.integers(-90, 90), 8, 248))
            pts.append((x, y))
        p = (np.array(pts) * sc * 16).astype(np.int32)
        cv2.polylines(img, [p], False, (70, 140, 60), max(1, int(2 * sc)), cv2.LINE_AA, 4)
        cv2.polylines(height, [p], False, 60, max(1, int(2 * sc)), cv2.LINE_AA, 4)
        for q in (p[0], p[-1]):
            cv2.circle(img, tuple(int(t) for t in q), int(4 * sc * 16), (215, 180, 80), -1, cv2.LINE_AA, 4)
            cv2.circle(img, tuple(int(t) for t in q), int(1.5 * sc * 16), (20, 20, 20), -1, cv2.LINE_AA, 4)
    for _ in range(4):
        x0, y0 = d.integers(30, 170, 2)
        cw, ch = d.integers(30, 70), d.integers(20, 50)
        for k in range(int(cw // 8)):
            px = int((x0 + 4 + k * 8) * sc)
            cv2.rectangle(img, (px, int((y0 - 5) * sc)), (px + max(1, int(3 * sc)), int((y0 + ch + 5) * sc)), (200, 200, 205), -1)
        cv2.rectangle(img, (int(x0 * sc), int(y0 * sc)), (int((x0 + cw) * sc), int((y0 + ch) * sc)), (22, 22, 24), -1)
        cv2.rectangle(height, (int(x0 * sc), int(y0 * sc)), (int((x0 + cw) * sc), int((y0 + ch) * sc)), 255, -1)
        cv2.circle(img, (int((x0 + 6) * sc), int((y0 + 6) * sc)), max(1, int(2 * sc)), (60, 60, 64), -1)
    for _ in range(10):
        x0, y0 = d.integers(15, 230, 2)
        cv2.rectangle(img, (int(x0 * sc), int(y0 * sc)), (int((x0 + d.integers(6, 20)) * sc), int((y0 + 3) * sc)), (230, 230, 225), -1)
    out = (img.astype(F32) / 255, height.astype(F32) / 255)
    for a in out:
        a.setflags(write=False)
    return out


def _pcb(rng: Rng, h: int, w: int, s: int) -> Scene:
    art, hgt = _pcb_layout(s)
    cx, cy, ang = _pose(rng, h, w, s, 0.02, (-0.05, 0.05))
    scale = 0.82 * rng.uniform(0.98, 1.02)
    m = cv2.getRotationMatrix2D((s / 2, s / 2), math.degrees(ang), scale)
    m[:, 2] += (cx - s / 2, cy - s / 2)
    art_w = cv2.warpAffine(art, m, (w, h), flags=cv2.INTER_LINEAR)
    hgt_w = cv2.warpAffine(hgt, m, (w, h), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(np.ones((s, s), F32), m, (w, h), flags=cv2.INTER_LINEAR)
    diff, spec = shading(hgt_w * F32(s * 0.02), light_dir(rng))
    tint = jitter(rng, (1, 1, 1), 0.03)
    col = art_w * tint * (0.55 + 0.5 * diff)[..., None] + F32(0.2) * spec[..., None]
    return _place(col, alpha, backdrop(rng, h, w, (0.12, 0.12, 0.13), 0.2), s)


def _cable(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.03, (-0.25, 0.25))
    yy, xx = grid(h, w)
    x, y = xx - F32(cx), yy - F32(cy)
    radius = F32(s * 0.43 * rng.uniform(0.98, 1.02))
    rho = np.sqrt(x * x + y * y)
    alpha = coverage(rho - radius)
    jacket = jitter(rng, (0.28, 0.29, 0.30))
    filler = jitter(rng, (0.82, 0.80, 0.74)) * (0.85 + 0.3 * value_noise(rng, xx / F32(2.0), yy / F32(2.0)))[..., None]
    col = blend(filler, jacket, 1 - coverage(rho - radius * F32(0.86)))
    height = np.clip((radius - rho) / F32(s * 0.02), 0, 1)
    ri = float(radius) * 0.36
    period = F32(2 * math.pi / (s * 0.022))
    for k, c in enumerate([(0.20, 0.55, 0.25), (0.15, 0.30, 0.70), (0.50, 0.30, 0.15)]):
        t = ang + k * 2 * math.pi / 3
        win, ox, oy = window(cx + math.cos(t) * radius * 0.45, cy + math.sin(t) * radius * 0.45, ri + 2, h, w)
        d = np.sqrt(ox * ox + oy * oy)
        part = blend(col[win], jitter(rng, c, 0.03), coverage(d - F32(ri)))
        strands = 0.5 + 0.25 * (np.cos(ox * period) + np.cos((ox * F32(0.5) + oy * F32(0.866)) * period))
        copper = jitter(rng, (0.80, 0.52, 0.25), 0.03) * (0.6 + 0.5 * strands)[..., None]
        col[win] = part + (copper - part) * coverage(d - F32(ri * 0.62))[..., None]
        height[win] += np.clip((F32(ri) - d) / F32(s * 0.015), 0, 1) * F32(0.5)
    diff, _ = shading(height * F32(s * 0.01), light_dir(rng))
    col = col * (0.55 + 0.5 * diff)[..., None]
    return _place(col, alpha, backdrop(rng, h, w, (0.85, 0.85, 0.85), 0.05), s)


def _gear(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.05, (0, 2 * math.pi))
    yy, xx = grid(h, w)
    x, y = xx - F32(cx), yy - F32(cy)
    rho = np.sqrt(x * x + y * y)
    theta = np.arctan2(y, x)
    teeth = int(design_rng("synth_gear").integers(12, 17))
    radius = F32(s * 0.34 * rng.uniform(0.98, 1.02))
    depth = radius * F32(0.11)
    edge = radius + depth * np.clip(F32(1.8) * np.cos(F32(teeth) * (theta - F32(ang))), -1, 1)
    hole = radius * F32(0.3)
    key_a, key_b = rotated(h, w, ang, cx, cy)
    key = np.maximum(np.abs(key_b) - F32(s * 0.02), np.abs(key_a - hole) - F32(s * 0.025))
    sdf = np.maximum(rho - edge, -np.minimum(rho - hole, key))
    alpha = coverage(sdf)
    brushed = value_noise(rng, theta * F32(s * 0.4), rho / F32(s * 0.3))
    hub = np.clip((radius * F32(0.55) - rho) / F32(s * 0.02), 0, 1)
    height = (np.clip(-sdf / F32(s * 0.02), 0, 1) + F32(0.6) * hub) * F32(s * 0.02)
    diff, spec = shading(height, light_dir(rng))
    col = _metal_colour(rng, "synth_gear") * ((0.3 + 0.7 * diff) * (0.9 + 0.2 * brushed))[..., None] + F32(0.3) * spec[..., None]
    return _place(col, alpha, backdrop(rng, h, w, (0.30, 0.33, 0.40), 0.15), s)


OBJECTS = {
    "synth_screw": _screw,
    "synth_nut": _nut,
    "synth_bottle": _bottle,
    "synth_pill": _pill,
    "synth_pcb": _pcb,
    "synth_cable": _cable,
    "synth_gear": _gear,
}
