"""Rendering for :mod:`shards.synth`: product classes, defects with exact masks, camera views.

Everything works on float32 RGB images in [0, 1] of shape (H, W, 3). A defect is
rendered as a coverage field ``a`` (0 outside the region it touches, up to 1 inside,
a one-pixel ramp at its border) and a target appearance ``T``; the defective image is
``I + a * (T - I)``. The mask is ``a >= MASK_LEVEL``: it comes from the renderer, and
pixels outside it are changed only in the anti-aliasing ring next to it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import cv2
import numpy as np

F32 = np.float32
Rng = np.random.Generator

MASK_LEVEL = 0.25
"""Coverage at and above which a pixel belongs to the defect mask."""
MIN_CHANGE = 8.0 / 255.0
"""Smallest colour change a defect makes inside its region (so every masked pixel changes)."""


@dataclass
class Scene:
    """A rendered normal image, with the product's coverage and what lies behind it."""

    image: np.ndarray  # (H, W, 3) float32
    obj: np.ndarray | None  # (H, W) float32 coverage of the product; None: the whole image
    background: np.ndarray | None  # (H, W, 3) float32 seen through a missing piece; None: dark backing


@dataclass(frozen=True)
class DefectSpec:
    """One defect to render: type, target area (fraction of the output image) and contrast."""

    kind: str
    area: float
    contrast: float


# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def design_rng(name: str) -> Rng:
    """The fixed design of a product class (layout, colours): the same for every seed."""
    return np.random.default_rng([zlib.crc32(name.encode()), 7])


def _vnoise(rng: Rng, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1] sampled at lattice coordinates (u, v) (cubic interpolation)."""
    u0, v0 = float(u.min()), float(v.min())
    gw = int(math.ceil(float(u.max()) - u0)) + 4
    gh = int(math.ceil(float(v.max()) - v0)) + 4
    lattice = rng.random((gh, gw), dtype=F32)
    mu = (u - (u0 - 1.5)).astype(F32, copy=False)
    mv = (v - (v0 - 1.5)).astype(F32, copy=False)
    return np.clip(cv2.remap(lattice, mu, mv, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT), 0, 1)


def _fbm(rng: Rng, u: np.ndarray, v: np.ndarray, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in about [0, 1]; (u, v) in cells of the coarsest octave."""
    total = np.zeros(u.shape, F32)
    amp, norm = 1.0, 0.0
    for _ in range(octaves):
        total += F32(amp) * _vnoise(rng, u, v)
        norm += amp
        u, v = u * F32(2.0), v * F32(2.0)
        amp *= 0.5
    return total / F32(norm)


def _rotated(h: int, w: int, angle: float, cx: float | None = None, cy: float | None = None):
    yy, xx = _grid(h, w)
    cx = w / 2 if cx is None else cx
    cy = h / 2 if cy is None else cy
    c, s = F32(math.cos(angle)), F32(math.sin(angle))
    x, y = xx - F32(cx), yy - F32(cy)
    return x * c + y * s, -x * s + y * c


def _coarse(h: int, w: int, factor: int = 8) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Full-resolution pixel coordinates of a grid ``factor`` times coarser: (x, y, gh, gw)."""
    gh, gw = max(2, h // factor), max(2, w // factor)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(F32)
    return (xx + F32(0.5)) * F32(w / gw) - F32(0.5), (yy + F32(0.5)) * F32(h / gh) - F32(0.5), gh, gw


def _up(small: np.ndarray, h: int, w: int) -> np.ndarray:
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _light(rng: Rng, h: int, w: int, strength: float) -> np.ndarray:
    """A smooth illumination gain: a linear gradient in a random direction and a vignette."""
    x, y, _, _ = _coarse(h, w)
    ang = rng.uniform(0, 2 * math.pi)
    x, y = x - F32(w / 2), y - F32(h / 2)
    u = x * F32(math.cos(ang)) + y * F32(math.sin(ang))
    half = max(h, w) / 2
    r2 = (x * x + y * y) / F32(half * half)
    gain = 1 + F32(strength * rng.uniform(0.3, 1.0) / max(h, w)) * u - F32(rng.uniform(0.0, 0.12)) * r2
    return _up(gain.astype(F32), h, w)


def _jitter(rng: Rng, colour, amount: float = 0.05) -> np.ndarray:
    c = np.asarray(colour, F32) * F32(1 + rng.normal(0, amount))
    return np.clip(c * (1 + rng.normal(0, amount / 2, 3)).astype(F32), 0, 1).astype(F32)


def _mix(a: np.ndarray, b, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of colours/images a -> b with weight t (H, W)."""
    return a + (np.asarray(b, F32) - a) * t[..., None]


def _shade(height: np.ndarray, light: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lambert and specular terms of a height map (pixel units) under a unit light direction."""
    gy, gx = np.gradient(height)
    nz = 1.0 / np.sqrt(1.0 + gx * gx + gy * gy)
    nx, ny = -gx * nz, -gy * nz
    diff = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
    half = light + np.array([0, 0, 1], F32)
    half /= np.linalg.norm(half)
    spec = np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0, 1) ** 24
    return diff.astype(F32), spec.astype(F32)


def _light_dir(rng: Rng, elevation: tuple[float, float] = (0.6, 0.9)) -> np.ndarray:
    az = rng.uniform(0, 2 * math.pi)
    el = rng.uniform(*elevation)
    return np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)], F32)


def _cov(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the region sdf <= 0 (sdf in pixels)."""
    return np.clip(F32(0.5) - sdf, 0, 1)


def _shadow(alpha: np.ndarray, size: int, strength: float) -> np.ndarray:
    """The soft shadow a product casts below and right of itself: a gain in [1 - strength, 1]."""
    h, w = alpha.shape
    small = cv2.resize(alpha, (max(2, w // 4), max(2, h // 4)), interpolation=cv2.INTER_AREA)
    off = size / 400
    m = np.float32([[1, 0, off], [0, 1, off]])
    shifted = cv2.warpAffine(small, m, (small.shape[1], small.shape[0]))
    return 1 - F32(strength) * _up(cv2.GaussianBlur(shifted, (0, 0), max(0.5, size / 320)), h, w)


def _background(rng: Rng, h: int, w: int, colour, noise: float) -> np.ndarray:
    """A plain surface behind a product: a colour with smooth blotches and uneven light."""
    s = max(h, w)
    x, y, _, _ = _coarse(h, w, 4)
    n = _fbm(rng, x / F32(s * 0.25), y / F32(s * 0.25), 2) - 0.5
    base = _jitter(rng, colour, 0.04)
    img = _up((base * (1 + F32(noise) * n)[..., None]).astype(F32), h, w)
    return (img * _light(rng, h, w, 0.25)[..., None]).astype(F32)


def _place(obj_rgb: np.ndarray, alpha: np.ndarray, bg: np.ndarray, size: int) -> Scene:
    behind = bg * _shadow(alpha, size, 0.35)[..., None]
    img = behind + (obj_rgb - behind) * alpha[..., None]
    return Scene(img.astype(F32), alpha.astype(F32), bg)


# --------------------------------------------------------------------------- textures


def _wood(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = _rotated(h, w, rng.uniform(-0.2, 0.2))
    warp = _fbm(rng, u / F32(s * 0.4), v / F32(s * 0.25), 2) - 0.5
    period = s * rng.uniform(0.045, 0.07)
    rings = (0.5 + 0.5 * np.sin((v + warp * F32(s * 0.15)) * F32(2 * math.pi / period) + F32(rng.uniform(0, 6.3)))) ** 2
    fibre = _vnoise(rng, u / F32(s * 0.1), v / F32(0.9))
    t = F32(0.6) * rings + F32(0.4) * fibre
    dark = _jitter(rng, (0.42, 0.26, 0.14))
    light = _jitter(rng, (0.80, 0.60, 0.40))
    img = np.broadcast_to(dark, (h, w, 3)) + (light - dark) * t[..., None]
    return Scene((img * _light(rng, h, w, 0.3)[..., None]).astype(F32), None, None)


def _fabric(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = _rotated(h, w, rng.uniform(-0.06, 0.06))
    p = F32(s * rng.uniform(0.028, 0.033))
    fu, fv = u / p + F32(rng.uniform(0, 2)), v / p + F32(rng.uniform(0, 2))
    iu, iv = np.floor(fu), np.floor(fv)
    ru, rv = fu - iu, fv - iv
    top = ((iu + iv) % 2) == 0
    pu, pv = np.sin(F32(math.pi) * ru), np.sin(F32(math.pi) * rv)
    height = np.where(top, pu * (0.55 + 0.45 * pv), pv * (0.55 + 0.45 * pu))
    fibre = _vnoise(rng, u / F32(s * 0.05), v / F32(1.2))
    val = (0.35 + 0.55 * height + 0.15 * (fibre - 0.5)).astype(F32)
    warp_c = _jitter(rng, (0.62, 0.55, 0.45))
    weft_c = _jitter(rng, (0.55, 0.50, 0.42))
    col = np.where(top[..., None], warp_c, weft_c)
    return Scene((col * val[..., None] * _light(rng, h, w, 0.3)[..., None]).astype(F32), None, None)


def _metal(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = _rotated(h, w, rng.uniform(-0.1, 0.1))
    streak = F32(0.6) * _vnoise(rng, u / F32(s * 0.5), v / F32(0.7)) + F32(0.4) * _vnoise(rng, u / F32(s * 0.12), v / F32(2.5))
    band_c = rng.uniform(-0.3, 0.3) * s
    band = 1 + F32(rng.uniform(0.15, 0.35)) * np.exp(-(((v - F32(band_c)) / F32(0.25 * s)) ** 2))
    base = _jitter(rng, design_rng("synth_metal").choice([(0.62, 0.63, 0.66), (0.55, 0.62, 0.72)]), 0.04)
    img = base * ((0.78 + 0.38 * streak) * band)[..., None] * _light(rng, h, w, 0.2)[..., None]
    return Scene(img.astype(F32), None, None)


def _mesh(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = _rotated(h, w, rng.uniform(-0.08, 0.08))
    p = F32(s * rng.uniform(0.075, 0.088))
    hw = F32(p * rng.uniform(0.15, 0.18))
    fu, fv = u / p + F32(rng.uniform(0, 1)), v / p + F32(rng.uniform(0, 1))
    du = np.abs(fu - np.round(fu)) * p
    dv = np.abs(fv - np.round(fv)) * p
    cu, cv = _cov(du - hw), _cov(dv - hw)
    pu = np.sqrt(np.clip(1 - (du / hw) ** 2, 0, 1))
    pv = np.sqrt(np.clip(1 - (dv / hw) ** 2, 0, 1))
    u_top = ((np.round(fu) + np.round(fv)) % 2) == 0
    both = (cu > 0) & (cv > 0)
    prof = np.where(both, np.where(u_top, pu, pv), np.maximum(pu * (cu > 0), pv * (cv > 0)))
    cov = np.maximum(cu, cv)
    bg = _background(rng, h, w, (0.10, 0.10, 0.11), 0.5)
    wire = _jitter(rng, (0.70, 0.70, 0.68)) * (0.3 + 0.7 * prof)[..., None]
    img = bg + (wire - bg) * cov[..., None]
    return Scene((img * _light(rng, h, w, 0.2)[..., None]).astype(F32), None, None)


def _tile(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = _rotated(h, w, rng.uniform(-0.04, 0.04))
    t = F32(s * rng.uniform(0.22, 0.26))
    u = u + F32(rng.uniform(0, t))
    v = v + F32(rng.uniform(0, t))
    iu, iv = np.floor(u / t), np.floor(v / t)
    fu, fv = u - iu * t, v - iv * t
    dg = np.minimum(np.minimum(fu, t - fu), np.minimum(fv, t - fv))
    g = F32(max(1.0, t * 0.045))
    grout = _cov(dg - g)
    iu = (iu - iu.min()).astype(np.int32)
    iv = (iv - iv.min()).astype(np.int32)
    shades = (1 + rng.normal(0, 0.05, (int(iv.max()) + 1, int(iu.max()) + 1))).astype(F32)
    base = _jitter(rng, (0.72, 0.70, 0.66))
    speck = _vnoise(rng, u / F32(1.3), v / F32(1.3))
    chips = np.clip((speck - 0.78) * 6, 0, 1)
    bevel = 1 - F32(0.12) * np.exp(-(dg - g) / F32(2.0 * s / 256))
    img = base * (shades[iv, iu] * bevel * (1 - F32(0.45) * chips))[..., None]
    img = _mix(img, _jitter(rng, (0.35, 0.34, 0.33)), grout)
    return Scene((img * _light(rng, h, w, 0.25)[..., None]).astype(F32), None, None)


def _leather(rng: Rng, h: int, w: int, s: int) -> Scene:
    cell = s * rng.uniform(0.03, 0.038)
    n = int(h * w / (cell * cell))
    seeds = np.full((h, w), 255, np.uint8)
    seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = 0
    dist = cv2.distanceTransform(seeds, cv2.DIST_L2, 5)
    bump = np.clip(1 - dist / F32(cell * 0.75), 0, 1) ** 0.6
    bump = cv2.GaussianBlur(bump, (3, 3), 0)
    diff, spec = _shade(bump * F32(cell * 0.5), _light_dir(rng, (0.5, 0.8)))
    base = _jitter(rng, design_rng("synth_leather").choice([(0.36, 0.21, 0.12), (0.22, 0.22, 0.24)]), 0.05)
    yy, xx = _grid(h, w)
    grain = _vnoise(rng, xx / F32(1.5), yy / F32(1.5)) - 0.5
    img = base * (0.55 + 0.6 * diff + 0.15 * grain)[..., None] + F32(0.12) * spec[..., None]
    return Scene((img * _light(rng, h, w, 0.2)[..., None]).astype(F32), None, None)


def _carpet(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = _rotated(h, w, rng.uniform(-0.05, 0.05))
    p = F32(s * rng.uniform(0.022, 0.027))
    wu = u + F32(0.35) * p * (_vnoise(rng, u / F32(s * 0.08), v / F32(s * 0.08)) - 0.5)
    wv = v + F32(0.35) * p * (_vnoise(rng, u / F32(s * 0.08), v / F32(s * 0.08)) - 0.5)
    row = np.floor(wv / p)
    bumps = (0.5 - 0.5 * np.cos(F32(2 * math.pi) * (wu / p + row * F32(0.5)))) * np.sin(F32(math.pi) * (wv / p - row))
    fibre = _vnoise(rng, u / F32(1.1), v / F32(1.1))
    val = 0.35 + 0.45 * bumps + 0.3 * (fibre - 0.5)
    base = _jitter(rng, design_rng("synth_carpet").choice([(0.55, 0.52, 0.48), (0.40, 0.45, 0.58)]), 0.04)
    return Scene((base * val[..., None] * _light(rng, h, w, 0.25)[..., None]).astype(F32), None, None)


# --------------------------------------------------------------------------- objects


def _pose(rng: Rng, h: int, w: int, s: int, shift: float, angle: tuple[float, float]) -> tuple[float, float, float]:
    """Centre and rotation of a product: near the image centre, shifted by up to ``shift * s``."""
    return (w / 2 + rng.uniform(-shift, shift) * s, h / 2 + rng.uniform(-shift, shift) * s, rng.uniform(*angle))


def _metal_colour(rng: Rng, name: str) -> np.ndarray:
    return _jitter(rng, design_rng(name).choice([(0.70, 0.71, 0.74), (0.78, 0.64, 0.36)]), 0.04)


def _screw(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.06, (0, 2 * math.pi))
    a, b = _rotated(h, w, ang, cx, cy)
    length = F32(s * 0.5 * rng.uniform(0.97, 1.03))
    r = F32(s * 0.045 * rng.uniform(0.97, 1.03))
    head_r, head_l = F32(s * 0.085), F32(s * 0.07)
    a = a + F32(head_l / 2)
    tip = np.clip((length / 2 - a) / (F32(2.5) * r), 0.05, 1)
    r_eff = r * tip
    sdf_shaft = np.maximum(np.abs(b) - r_eff, np.maximum(-(a + length / 2), a - length / 2))
    ha = a + length / 2 + head_l / 2
    sdf_head = np.maximum(np.abs(b) - head_r, np.abs(ha) - head_l / 2)
    alpha = _cov(np.minimum(sdf_shaft, sdf_head))
    pitch = F32(s * 0.028)
    thread = 0.5 + 0.5 * np.sin(F32(2 * math.pi) * (a + F32(0.35) * b) / pitch)
    hs = r_eff * np.sqrt(np.clip(1 - (b / r_eff) ** 2, 0, 1)) * (0.8 + 0.2 * thread)
    hh = head_r * F32(0.5) * np.sqrt(np.clip(1 - (b / head_r) ** 2, 0, 1)) * (np.abs(b) > F32(s * 0.012))
    height = np.where(sdf_head < sdf_shaft, hh, hs) * alpha
    diff, spec = _shade(height, _light_dir(rng))
    col = _metal_colour(rng, "synth_screw") * (0.25 + 0.75 * diff)[..., None] + F32(0.5) * spec[..., None]
    return _place(col, alpha, _background(rng, h, w, (0.86, 0.86, 0.84), 0.06), s)


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
    x, y = _rotated(h, w, ang, cx, cy)
    ri = F32(s * 0.27 * rng.uniform(0.98, 1.02))
    hole = F32(ri * 0.5 * rng.uniform(0.97, 1.03))
    rho = np.sqrt(x * x + y * y)
    sdf_out = _hexagon_sdf(x, y, ri)
    sdf = np.maximum(sdf_out, hole - rho)
    alpha = _cov(sdf)
    bevel = F32(s * 0.03)
    height = np.clip(-sdf_out / bevel, 0, 1) * np.clip((rho - hole) / bevel, 0, 1) * bevel
    height += F32(0.15) * bevel * np.sin(F32(2 * math.pi) * rho / F32(s * 0.012)) * (rho < hole + bevel)
    diff, spec = _shade(height * alpha, _light_dir(rng))
    col = _metal_colour(rng, "synth_nut") * (0.3 + 0.7 * diff)[..., None] + F32(0.35) * spec[..., None]
    return _place(col, alpha, _background(rng, h, w, (0.18, 0.18, 0.20), 0.2), s)


def _bottle(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, _ = _pose(rng, h, w, s, 0.03, (0, 0))
    yy, xx = _grid(h, w)
    x, y = xx - F32(cx), yy - F32(cy)
    radius = F32(s * 0.42 * rng.uniform(0.98, 1.02))
    rho = np.sqrt(x * x + y * y) / radius
    theta = np.arctan2(y, x)
    alpha = _cov((rho - 1) * radius)
    glass = _jitter(rng, design_rng("synth_bottle").choice([(0.30, 0.20, 0.10), (0.12, 0.28, 0.14)]), 0.05)
    wall = np.clip((rho - 0.72) / 0.28, 0, 1)
    lip = np.exp(-(((rho - 0.62) / 0.07) ** 2))
    ang_l = rng.uniform(0, 2 * math.pi)
    highlight = np.exp(-(((rho - 0.84) / 0.05) ** 2)) * np.clip(np.cos(theta - F32(ang_l)), 0, 1) ** 4
    ripple = 0.06 * np.sin(rho * F32(55.0) + F32(rng.uniform(0, 6.3)))
    val = 0.25 + 0.5 * wall + 0.9 * lip * (0.7 + 0.3 * np.cos(theta - F32(ang_l))) + ripple
    inner = np.clip((0.5 - rho) / 0.5, 0, 1)
    col = glass * (val * (1 - 0.6 * inner))[..., None] + F32(0.7) * highlight[..., None]
    return _place(col, alpha, _background(rng, h, w, (0.04, 0.04, 0.04), 0.3), s)


def _pill(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.05, (-0.1, 0.1))
    a, b = _rotated(h, w, ang, cx, cy)
    half = F32(s * 0.31 * rng.uniform(0.98, 1.02))
    r = F32(s * 0.13 * rng.uniform(0.98, 1.02))
    da = np.maximum(np.abs(a) - (half - r), 0)
    d = np.sqrt(da * da + b * b)
    alpha = _cov(d - r)
    height = np.sqrt(np.clip(r * r - d * d, 0, None))
    diff, spec = _shade(height, _light_dir(rng))
    d_rng = design_rng("synth_pill")
    pair = d_rng.choice([((0.85, 0.25, 0.15), (0.92, 0.90, 0.86)), ((0.95, 0.60, 0.15), (0.95, 0.60, 0.15))])
    c1, c2 = _jitter(rng, pair[0], 0.03), _jitter(rng, pair[1], 0.03)
    col = np.where((a < 0)[..., None], c1, c2)
    seam = 1 - F32(0.35) * np.exp(-((a / F32(s * 0.006)) ** 2))
    col = col * ((0.35 + 0.65 * diff) * seam)[..., None] + F32(0.45) * spec[..., None]
    return _place(col, alpha, _background(rng, h, w, (0.10, 0.10, 0.11), 0.2), s)


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
    diff, spec = _shade(hgt_w * F32(s * 0.02), _light_dir(rng))
    tint = _jitter(rng, (1, 1, 1), 0.03)
    col = art_w * tint * (0.55 + 0.5 * diff)[..., None] + F32(0.2) * spec[..., None]
    return _place(col, alpha, _background(rng, h, w, (0.12, 0.12, 0.13), 0.2), s)


def _cable(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.03, (-0.25, 0.25))
    yy, xx = _grid(h, w)
    x, y = xx - F32(cx), yy - F32(cy)
    radius = F32(s * 0.43 * rng.uniform(0.98, 1.02))
    rho = np.sqrt(x * x + y * y)
    alpha = _cov(rho - radius)
    jacket = _jitter(rng, (0.28, 0.29, 0.30))
    filler = _jitter(rng, (0.82, 0.80, 0.74)) * (0.85 + 0.3 * _vnoise(rng, xx / F32(2.0), yy / F32(2.0)))[..., None]
    col = _mix(filler, jacket, 1 - _cov(rho - radius * F32(0.86)))
    height = np.clip((radius - rho) / F32(s * 0.02), 0, 1)
    ri = float(radius) * 0.36
    period = F32(2 * math.pi / (s * 0.022))
    for k, c in enumerate([(0.20, 0.55, 0.25), (0.15, 0.30, 0.70), (0.50, 0.30, 0.15)]):
        t = ang + k * 2 * math.pi / 3
        win, ox, oy = _window(cx + math.cos(t) * radius * 0.45, cy + math.sin(t) * radius * 0.45, ri + 2, h, w)
        d = np.sqrt(ox * ox + oy * oy)
        part = _mix(col[win], _jitter(rng, c, 0.03), _cov(d - F32(ri)))
        strands = 0.5 + 0.25 * (np.cos(ox * period) + np.cos((ox * F32(0.5) + oy * F32(0.866)) * period))
        copper = _jitter(rng, (0.80, 0.52, 0.25), 0.03) * (0.6 + 0.5 * strands)[..., None]
        col[win] = part + (copper - part) * _cov(d - F32(ri * 0.62))[..., None]
        height[win] += np.clip((F32(ri) - d) / F32(s * 0.015), 0, 1) * F32(0.5)
    diff, _ = _shade(height * F32(s * 0.01), _light_dir(rng))
    col = col * (0.55 + 0.5 * diff)[..., None]
    return _place(col, alpha, _background(rng, h, w, (0.85, 0.85, 0.85), 0.05), s)


def _gear(rng: Rng, h: int, w: int, s: int) -> Scene:
    cx, cy, ang = _pose(rng, h, w, s, 0.05, (0, 2 * math.pi))
    yy, xx = _grid(h, w)
    x, y = xx - F32(cx), yy - F32(cy)
    rho = np.sqrt(x * x + y * y)
    theta = np.arctan2(y, x)
    teeth = int(design_rng("synth_gear").integers(12, 17))
    radius = F32(s * 0.34 * rng.uniform(0.98, 1.02))
    depth = radius * F32(0.11)
    edge = radius + depth * np.clip(F32(1.8) * np.cos(F32(teeth) * (theta - F32(ang))), -1, 1)
    hole = radius * F32(0.3)
    key_a, key_b = _rotated(h, w, ang, cx, cy)
    key = np.maximum(np.abs(key_b) - F32(s * 0.02), np.abs(key_a - hole) - F32(s * 0.025))
    sdf = np.maximum(rho - edge, -np.minimum(rho - hole, key))
    alpha = _cov(sdf)
    brushed = _vnoise(rng, theta * F32(s * 0.4), rho / F32(s * 0.3))
    hub = np.clip((radius * F32(0.55) - rho) / F32(s * 0.02), 0, 1)
    height = (np.clip(-sdf / F32(s * 0.02), 0, 1) + F32(0.6) * hub) * F32(s * 0.02)
    diff, spec = _shade(height, _light_dir(rng))
    col = _metal_colour(rng, "synth_gear") * ((0.3 + 0.7 * diff) * (0.9 + 0.2 * brushed))[..., None] + F32(0.3) * spec[..., None]
    return _place(col, alpha, _background(rng, h, w, (0.30, 0.33, 0.40), 0.15), s)


@dataclass(frozen=True)
class ClassSpec:
    kind: str  # "texture" or "object"
    render: Callable[[Rng, int, int, int], Scene]


TEXTURES = {
    "synth_wood": _wood,
    "synth_fabric": _fabric,
    "synth_metal": _metal,
    "synth_mesh": _mesh,
    "synth_tile": _tile,
    "synth_leather": _leather,
    "synth_carpet": _carpet,
}
OBJECTS = {
    "synth_screw": _screw,
    "synth_nut": _nut,
    "synth_bottle": _bottle,
    "synth_pill": _pill,
    "synth_pcb": _pcb,
    "synth_cable": _cable,
    "synth_gear": _gear,
}
CLASSES: dict[str, ClassSpec] = {}
for _t, _o in zip(TEXTURES.items(), OBJECTS.items()):
    CLASSES[_t[0]] = ClassSpec("texture", _t[1])
    CLASSES[_o[0]] = ClassSpec("object", _o[1])


def render_class(name: str, rng: Rng, size: int, canvas: int | None = None) -> Scene:
    """A normal image of a product class (a new instance for every rng state).

    Features are scaled to ``size``; the image is ``canvas`` pixels wide (default ``size``),
    with the product centred, so that a larger canvas shows more of its surroundings."""
    side = canvas or size
    scene = CLASSES[name].render(rng, side, side, size)
    np.clip(scene.image, 0, 1, out=scene.image)
    if scene.background is not None:
        scene.background = np.clip(scene.background, 0, 1)
    return scene


def scene_from_image(rgb: np.ndarray, size: int) -> Scene:
    """A user's normal image (uint8 RGB), centre-cropped to a square and resized to ``size``."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = rgb[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    img = cv2.resize(crop, (size, size), interpolation=interp).astype(F32) / 255
    return Scene(np.clip(img, 0, 1), None, None)


# --------------------------------------------------------------------------- defects

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


def _window(cx: float, cy: float, half: float, h: int, w: int):
    y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 2)
    x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(F32)
    return (slice(y0, y1), slice(x0, x1)), xx - F32(cx), yy - F32(cy)


def _field_cov(field: np.ndarray, thr: float) -> np.ndarray:
    """Coverage of {field > thr} with a one-pixel anti-aliased ramp (first-order distance)."""
    gy, gx = np.gradient(field)
    g = np.sqrt(gx * gx + gy * gy) + F32(1e-6)
    return np.clip((field - F32(thr)) / g + F32(0.5), 0, 1).astype(F32)


def _blob(rng: Rng, cx: float, cy: float, area: float, h: int, w: int, rough: float, elong: float):
    """An irregular blob of about ``area`` pixels: (coverage, window, normalised depth, x, y)."""
    r = math.sqrt(area / math.pi)
    win, x, y = _window(cx, cy, 2.2 * r * elong + 3, h, w)
    ang = rng.uniform(0, math.pi)
    c, s = F32(math.cos(ang)), F32(math.sin(ang))
    xr, yr = x * c + y * s, -x * s + y * c
    rho = np.sqrt((xr / F32(elong)) ** 2 + (yr * F32(elong)) ** 2) / F32(r)
    cell = F32(max(r * 0.5, 1.0))
    field = -rho + F32(2 * rough) * (_fbm(rng, x / cell, y / cell, 2) - 0.5)
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
    light = _light_dir(rng)
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
    colour = _jitter(rng, stains[rng.integers(len(stains))], 0.05)
    cell = F32(max(math.sqrt(area) * 0.3, 1.0))
    opacity = F32(c) * (0.55 + 0.45 * _vnoise(rng, x / cell, y / cell))
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
        backing = F32(rng.uniform(0.05, 0.12)) * (0.8 + 0.4 * _vnoise(rng, x / cell, y / cell))
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
    light = _light_dir(rng)
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
    streak = _vnoise(rng, u / F32(max(math.sqrt(area) * 0.5, 2.0)), v / F32(0.8)) - 0.5
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


# --------------------------------------------------------------------------- views


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def view_homography(rng: Rng, view: int, size: int, canvas: int) -> np.ndarray:
    """Output-to-canvas homography of camera ``view`` (0: top view C1; 1..4: tilted views)."""
    if view == 0:
        zoom, tilt, rot, direction = rng.uniform(0.97, 1.03), 0.0, rng.uniform(-0.05, 0.05), 0.0
    else:
        zoom, tilt = rng.uniform(0.92, 1.1), rng.uniform(0.12, 0.2)
        rot = rng.uniform(-0.12, 0.12)
        direction = (view - 1) * math.pi / 2 + rng.uniform(-0.2, 0.2)
    half = size / (2 * zoom)
    dvec = np.array([math.cos(direction), math.sin(direction)])
    pvec = np.array([-dvec[1], dvec[0]])
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    along, across = corners @ dvec, corners @ pvec
    quad = (along[:, None] * dvec + (across * (1 + tilt * along))[:, None] * pvec) * half
    c, s = math.cos(rot), math.sin(rot)
    quad = quad @ np.array([[c, s], [-s, c]]) + canvas / 2 + rng.uniform(-0.03, 0.03, 2) * size
    out = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float32)
    return cv2.getPerspectiveTransform(out, quad.astype(np.float32))


def warp_view(img: np.ndarray, hom: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpPerspective(
        img, hom, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT101
    )


def view_light(rng: Rng, size: int) -> np.ndarray:
    """The illumination gain of one camera view."""
    return (_light(rng, size, size, 0.35) * F32(rng.uniform(0.85, 1.1)))[..., None]
