"""Stochastic surfaces modelled on inspection imagery: sandblasted metal, paper, a painted
coat, a sand-cast surface and a non-woven fabric.

Each renderer takes (rng, height, width, feature scale) and returns a :class:`Scene` without
a product outline. Brightness varies across the part (:func:`~shards.synth.draw.lighting`).
Grey-level products have three equal channels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from shards.synth.draw import F32, Rng, Scene, coarse, design_rng, fbm, grey3, jitter, light_dir, lighting, shading, upsample


def _fine_noise(rng: Rng, h: int, w: int, sigma: float) -> np.ndarray:
    """White noise blurred to grains of about ``sigma`` pixels, scaled to unit deviation."""
    n = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=F32), (0, 0), sigma)
    return n / F32(max(float(n.std()), 1e-6))


def _cloud(rng: Rng, h: int, w: int, scale: float, octaves: int = 3) -> np.ndarray:
    """Smooth fractal noise in about [0, 1] with features of ``scale`` pixels (computed coarse)."""
    x, y, _, _ = coarse(h, w, 4)
    return upsample(fbm(rng, x / F32(scale), y / F32(scale), octaves), h, w)


def _sandblast(rng: Rng, h: int, w: int, s: int) -> Scene:
    """Sandblasted or bead-blasted metal: an isotropic fine grain, matte, with a hot spot (grey)."""
    sc = s / 256
    height = _fine_noise(rng, h, w, 0.7 * sc) * F32(0.45 * sc) + _fine_noise(rng, h, w, 1.6 * sc) * F32(0.35 * sc)
    diff, _ = shading(height, light_dir(rng, (0.6, 0.85)))
    base = F32(rng.uniform(0.5, 0.66))
    val = base * (0.55 + 0.5 * diff) * (0.94 + 0.12 * _cloud(rng, h, w, s * 0.4, 2))
    return Scene(grey3(val * lighting(rng, h, w, s, 0.35)), None, None, grey=True)


def _segments(rng: Rng, n: int, h: int, w: int, length: float, points: int, bend: float) -> list[np.ndarray]:
    """``n`` random fibres: smooth random walks of ``points`` points and about ``length`` pixels (x16, for cv2)."""
    step = length / max(points - 1, 1)
    head = rng.uniform(0, 2 * math.pi, (n, 1)) + np.cumsum(rng.normal(0, bend, (n, points)), 1)
    start = rng.uniform((-0.1 * w, -0.1 * h), (1.1 * w, 1.1 * h), (n, 1, 2))
    pts = start + np.cumsum(np.stack([np.cos(head), np.sin(head)], -1) * step, 1)
    return list((pts * 16).round().astype(np.int32))


def _fibre_layer(rng: Rng, h: int, w: int, n: int, length: float, points: int, bend: float, groups: int) -> np.ndarray:
    """Anti-aliased fibres drawn in ``groups`` strengths: (H, W) in [0, 1]."""
    canvas = np.zeros((h, w), np.uint8)
    fibres = _segments(rng, n, h, w, length, points, bend)
    for g in range(groups):
        cv2.polylines(canvas, fibres[g::groups], False, int(255 * (g + 1) / groups), 1, cv2.LINE_AA, 4)
    return canvas.astype(F32) / 255


def _paper(rng: Rng, h: int, w: int, s: int) -> Scene:
    """Paper: cloudy formation, short fibres lighter and darker than the sheet, fine grain (grey)."""
    formation = _cloud(rng, h, w, s * 0.08)
    count = int(h * w / 110 * rng.uniform(0.8, 1.2))
    dark = _fibre_layer(rng, h, w, count, s * rng.uniform(0.04, 0.07), 4, 0.25, 3)
    light = _fibre_layer(rng, h, w, count // 2, s * 0.05, 4, 0.25, 2)
    grain = _fine_noise(rng, h, w, 0.6)
    base = F32(rng.uniform(0.7, 0.8))
    val = base * (0.9 + 0.16 * formation) - F32(0.13) * dark + F32(0.05) * light + F32(0.015) * grain
    return Scene(grey3(val * lighting(rng, h, w, s, 0.15)), None, None, grey=True)


def _painted(rng: Rng, h: int, w: int, s: int) -> Scene:
    """A glossy painted coat: orange peel, metallic flakes that sparkle, a strong hot spot."""
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    peel = fbm(rng, xx / F32(s * 0.04), yy / F32(s * 0.04), 2) * F32(s * 0.004)
    diff, spec = shading(peel, light_dir(rng, (0.75, 0.95)))
    flakes = cv2.GaussianBlur((rng.random((h, w), dtype=F32) > 0.985).astype(F32) * rng.random((h, w), dtype=F32), (3, 3), 0.5)
    colour = jitter(rng, design_rng("synth_painted").choice([(0.62, 0.09, 0.08), (0.10, 0.22, 0.55)]), 0.04)
    img = colour * (0.6 + 0.45 * diff)[..., None] + (F32(0.25) * spec + F32(0.35) * flakes)[..., None]
    return Scene((img * lighting(rng, h, w, s, 0.45)[..., None]).astype(F32), None, None)


def _cast(rng: Rng, h: int, w: int, s: int) -> Scene:
    """A sand-cast iron surface: rough grains of several sizes, dull, uneven (grey)."""
    sc = s / 256
    rough = _fine_noise(rng, h, w, 1.2 * sc) * F32(0.7 * sc) + _fine_noise(rng, h, w, 3.5 * sc) * F32(1.5 * sc)
    height = rough + _cloud(rng, h, w, s * 0.25, 2) * F32(4 * sc)
    diff, spec = shading(height, light_dir(rng, (0.5, 0.8)))
    base = F32(rng.uniform(0.34, 0.46))
    val = base * (0.45 + 0.7 * diff) + F32(0.05) * spec
    return Scene(grey3(val * lighting(rng, h, w, s, 0.25)), None, None, grey=True)


def _nonwoven(rng: Rng, h: int, w: int, s: int) -> Scene:
    """A non-woven fabric: long curved fibres in every direction over an uneven, cloudy web."""
    web = _cloud(rng, h, w, s * 0.12)
    count = int(h * w / 300 * rng.uniform(0.8, 1.2))
    fibres = _fibre_layer(rng, h, w, count, s * rng.uniform(0.25, 0.4), 10, 0.18, 4)
    colour = jitter(rng, design_rng("synth_nonwoven").choice([(0.45, 0.62, 0.80), (0.80, 0.82, 0.84)]), 0.03)
    val = 0.62 + 0.25 * web + 0.3 * fibres - 0.1 * (1 - web) * (1 - fibres)
    return Scene((colour * (val * lighting(rng, h, w, s, 0.2))[..., None]).astype(F32), None, None)


SURFACES = {
    "synth_sandblast": _sandblast,
    "synth_paper": _paper,
    "synth_painted": _painted,
    "synth_cast": _cast,
    "synth_nonwoven": _nonwoven,
}
"""The stochastic surfaces."""
