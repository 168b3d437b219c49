"""The drawing helpers every product and defect of the synthetic data shares.

Everything works on float32 RGB images in [0, 1] of shape (H, W, 3): value noise and its
fractal sum, pixel grids and rotated coordinates, smooth illumination, colour jitter and
blending, Lambert/specular shading of a height map, anti-aliased coverage, the plain
backdrop behind a product and :class:`Scene`, what a product renders into.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np


F32 = np.float32
Rng = np.random.Generator


@dataclass(frozen=True)
class Cells:
    """The cells of a periodic product: pitches (pixels) along the rotated axes u and v, the
    rotation, and a point where four cells meet. u = (x - x0) cos + (y - y0) sin, v = -(x - x0) sin + (y - y0) cos."""

    pu: float
    pv: float
    angle: float = 0.0
    x0: float = 0.0
    y0: float = 0.0


@dataclass
class Scene:
    """A rendered normal image, with the product's coverage and what lies behind it."""

    image: np.ndarray  # (H, W, 3) float32
    obj: np.ndarray | None  # (H, W) float32 coverage of the product; None: the whole image
    background: np.ndarray | None  # (H, W, 3) float32 seen through a missing piece; None: dark backing
    grey: bool = False  # a grey-level product: the three channels are equal, and stay so with a defect
    cells: Cells | None = None  # the cells of a periodic product; None: not periodic, or not known
    plain: np.ndarray | None = None  # (H, W, 3) the product without its periodic features (a cell left out)


@lru_cache(maxsize=8)
def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def design_rng(name: str) -> Rng:
    """The fixed design of a product class (layout, colours): the same for every seed."""
    return np.random.default_rng([zlib.crc32(name.encode()), 7])


def value_noise(rng: Rng, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1] sampled at lattice coordinates (u, v) (cubic interpolation)."""
    u0, v0 = float(u.min()), float(v.min())
    gw = int(math.ceil(float(u.max()) - u0)) + 4
    gh = int(math.ceil(float(v.max()) - v0)) + 4
    lattice = rng.random((gh, gw), dtype=F32)
    mu = (u - (u0 - 1.5)).astype(F32, copy=False)
    mv = (v - (v0 - 1.5)).astype(F32, copy=False)
    return np.clip(cv2.remap(lattice, mu, mv, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT), 0, 1)


def fbm(rng: Rng, u: np.ndarray, v: np.ndarray, octaves: int = 3) -> np.ndarray:
    """Fractal value noise in about [0, 1]; (u, v) in cells of the coarsest octave."""
    total = np.zeros(u.shape, F32)
    amp, norm = 1.0, 0.0
    for _ in range(octaves):
        total += F32(amp) * value_noise(rng, u, v)
        norm += amp
        u, v = u * F32(2.0), v * F32(2.0)
        amp *= 0.5
    return total / F32(norm)


def rotated(h: int, w: int, angle: float, cx: float | None = None, cy: float | None = None):
    yy, xx = grid(h, w)
    cx = w / 2 if cx is None else cx
    cy = h / 2 if cy is None else cy
    c, s = F32(math.cos(angle)), F32(math.sin(angle))
    x, y = xx - F32(cx), yy - F32(cy)
    return x * c + y * s, -x * s + y * c


def coarse(h: int, w: int, factor: int = 8) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Full-resolution pixel coordinates of a grid ``factor`` times coarser: (x, y, gh, gw)."""
    gh, gw = max(2, h // factor), max(2, w // factor)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(F32)
    return (xx + F32(0.5)) * F32(w / gw) - F32(0.5), (yy + F32(0.5)) * F32(h / gh) - F32(0.5), gh, gw


def upsample(small: np.ndarray, h: int, w: int) -> np.ndarray:
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def illumination(rng: Rng, h: int, w: int, strength: float) -> np.ndarray:
    """A smooth illumination gain: a linear gradient in a random direction and a vignette."""
    x, y, _, _ = coarse(h, w)
    ang = rng.uniform(0, 2 * math.pi)
    x, y = x - F32(w / 2), y - F32(h / 2)
    u = x * F32(math.cos(ang)) + y * F32(math.sin(ang))
    half = max(h, w) / 2
    r2 = (x * x + y * y) / F32(half * half)
    gain = 1 + F32(strength * rng.uniform(0.3, 1.0) / max(h, w)) * u - F32(rng.uniform(0.0, 0.12)) * r2
    return upsample(gain.astype(F32), h, w)


def lighting(rng: Rng, h: int, w: int, s: int, hot: float = 0.3) -> np.ndarray:
    """Brightness that varies across the part: a gradient in a random direction and, in most
    images, a hot spot (a broad highlight of up to ``hot`` extra brightness) somewhere on it."""
    x, y, _, _ = coarse(h, w)
    ang = rng.uniform(0, 2 * math.pi)
    u = (x - F32(w / 2)) * F32(math.cos(ang)) + (y - F32(h / 2)) * F32(math.sin(ang))
    gain = 1 + F32(rng.uniform(0.08, 0.3) / max(h, w)) * u
    if rng.random() < 0.75:
        hx, hy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        r = F32(rng.uniform(0.15, 0.45) * s)
        gain = gain + F32(rng.uniform(0.05, hot)) * np.exp(-((x - F32(hx)) ** 2 + (y - F32(hy)) ** 2) / (2 * r * r))
    return upsample(gain.astype(F32), h, w)


def grey3(v: np.ndarray) -> np.ndarray:
    """A grey-level image (H, W) as RGB with three equal channels."""
    return np.repeat(np.asarray(v, F32)[..., None], 3, -1)


def jitter(rng: Rng, colour, amount: float = 0.05) -> np.ndarray:
    c = np.asarray(colour, F32) * F32(1 + rng.normal(0, amount))
    return np.clip(c * (1 + rng.normal(0, amount / 2, 3)).astype(F32), 0, 1).astype(F32)


def blend(a: np.ndarray, b, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of colours/images a -> b with weight t (H, W)."""
    return a + (np.asarray(b, F32) - a) * t[..., None]


def shading(height: np.ndarray, light: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lambert and specular terms of a height map (pixel units) under a unit light direction."""
    gy, gx = np.gradient(height)
    nz = 1.0 / np.sqrt(1.0 + gx * gx + gy * gy)
    nx, ny = -gx * nz, -gy * nz
    diff = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
    half = light + np.array([0, 0, 1], F32)
    half /= np.linalg.norm(half)
    spec = np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0, 1) ** 24
    return diff.astype(F32), spec.astype(F32)


def light_dir(rng: Rng, elevation: tuple[float, float] = (0.6, 0.9)) -> np.ndarray:
    az = rng.uniform(0, 2 * math.pi)
    el = rng.uniform(*elevation)
    return np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)], F32)


def coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the region sdf <= 0 (sdf in pixels)."""
    return np.clip(F32(0.5) - sdf, 0, 1)


def backdrop(rng: Rng, h: int, w: int, colour, noise: float) -> np.ndarray:
    """A plain surface behind a product: a colour with smooth blotches and uneven light."""
    s = max(h, w)
    x, y, _, _ = coarse(h, w, 4)
    n = fbm(rng, x / F32(s * 0.25), y / F32(s * 0.25), 2) - 0.5
    base = jitter(rng, colour, 0.04)
    img = upsample((base * (1 + F32(noise) * n)[..., None]).astype(F32), h, w)
    return (img * illumination(rng, h, w, 0.25)[..., None]).astype(F32)


def window(cx: float, cy: float, half: float, h: int, w: int):
    y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 2)
    x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(F32)
    return (slice(y0, y1), slice(x0, x1)), xx - F32(cx), yy - F32(cy)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
