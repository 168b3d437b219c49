"""The texture classes of the synthetic data: surfaces that fill the whole image.

Each renderer takes (rng, height, width, feature scale) and returns a :class:`Scene`
without a product outline; :data:`TEXTURES` names them.
"""

from __future__ import annotations

import math

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
    fbm,
    grid,
    illumination,
    jitter,
    light_dir,
    rotated,
    shading,
    value_noise,
)


def _wood(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = rotated(h, w, rng.uniform(-0.2, 0.2))
    warp = fbm(rng, u / F32(s * 0.4), v / F32(s * 0.25), 2) - 0.5
    period = s * rng.uniform(0.045, 0.07)
    rings = (0.5 + 0.5 * np.sin((v + warp * F32(s * 0.15)) * F32(2 * math.pi / period) + F32(rng.uniform(0, 6.3)))) ** 2
    fibre = value_noise(rng, u / F32(s * 0.1), v / F32(0.9))
    t = F32(0.6) * rings + F32(0.4) * fibre
    dark = jitter(rng, (0.42, 0.26, 0.14))
    light = jitter(rng, (0.80, 0.60, 0.40))
    img = np.broadcast_to(dark, (h, w, 3)) + (light - dark) * t[..., None]
    return Scene((img * illumination(rng, h, w, 0.3)[..., None]).astype(F32), None, None)


def _fabric(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = rotated(h, w, rng.uniform(-0.06, 0.06))
    p = F32(s * rng.uniform(0.028, 0.033))
    fu, fv = u / p + F32(rng.uniform(0, 2)), v / p + F32(rng.uniform(0, 2))
    iu, iv = np.floor(fu), np.floor(fv)
    ru, rv = fu - iu, fv - iv
    top = ((iu + iv) % 2) == 0
    pu, pv = np.sin(F32(math.pi) * ru), np.sin(F32(math.pi) * rv)
    height = np.where(top, pu * (0.55 + 0.45 * pv), pv * (0.55 + 0.45 * pu))
    fibre = value_noise(rng, u / F32(s * 0.05), v / F32(1.2))
    val = (0.35 + 0.55 * height + 0.15 * (fibre - 0.5)).astype(F32)
    warp_c = jitter(rng, (0.62, 0.55, 0.45))
    weft_c = jitter(rng, (0.55, 0.50, 0.42))
    col = np.where(top[..., None], warp_c, weft_c)
    return Scene((col * val[..., None] * illumination(rng, h, w, 0.3)[..., None]).astype(F32), None, None)


def _metal(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = rotated(h, w, rng.uniform(-0.1, 0.1))
    streak = F32(0.6) * value_noise(rng, u / F32(s * 0.5), v / F32(0.7)) + F32(0.4) * value_noise(rng, u / F32(s * 0.12), v / F32(2.5))
    band_c = rng.uniform(-0.3, 0.3) * s
    band = 1 + F32(rng.uniform(0.15, 0.35)) * np.exp(-(((v - F32(band_c)) / F32(0.25 * s)) ** 2))
    base = jitter(rng, design_rng("synth_metal").choice([(0.62, 0.63, 0.66), (0.55, 0.62, 0.72)]), 0.04)
    img = base * ((0.78 + 0.38 * streak) * band)[..., None] * illumination(rng, h, w, 0.2)[..., None]
    return Scene(img.astype(F32), None, None)


def _mesh(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = rotated(h, w, rng.uniform(-0.08, 0.08))
    p = F32(s * rng.uniform(0.075, 0.088))
    hw = F32(p * rng.uniform(0.15, 0.18))
    fu, fv = u / p + F32(rng.uniform(0, 1)), v / p + F32(rng.uniform(0, 1))
    du = np.abs(fu - np.round(fu)) * p
    dv = np.abs(fv - np.round(fv)) * p
    cu, cv = coverage(du - hw), coverage(dv - hw)
    pu = np.sqrt(np.clip(1 - (du / hw) ** 2, 0, 1))
    pv = np.sqrt(np.clip(1 - (dv / hw) ** 2, 0, 1))
    u_top = ((np.round(fu) + np.round(fv)) % 2) == 0
    both = (cu > 0) & (cv > 0)
    prof = np.where(both, np.where(u_top, pu, pv), np.maximum(pu * (cu > 0), pv * (cv > 0)))
    cov = np.maximum(cu, cv)
    bg = backdrop(rng, h, w, (0.10, 0.10, 0.11), 0.5)
    wire = jitter(rng, (0.70, 0.70, 0.68)) * (0.3 + 0.7 * prof)[..., None]
    img = bg + (wire - bg) * cov[..., None]
    return Scene((img * illumination(rng, h, w, 0.2)[..., None]).astype(F32), None, None)


def _tile(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = rotated(h, w, rng.uniform(-0.04, 0.04))
    t = F32(s * rng.uniform(0.22, 0.26))
    u = u + F32(rng.uniform(0, t))
    v = v + F32(rng.uniform(0, t))
    iu, iv = np.floor(u / t), np.floor(v / t)
    fu, fv = u - iu * t, v - iv * t
    dg = np.minimum(np.minimum(fu, t - fu), np.minimum(fv, t - fv))
    g = F32(max(1.0, t * 0.045))
    grout = coverage(dg - g)
    iu = (iu - iu.min()).astype(np.int32)
    iv = (iv - iv.min()).astype(np.int32)
    shades = (1 + rng.normal(0, 0.05, (int(iv.max()) + 1, int(iu.max()) + 1))).astype(F32)
    base = jitter(rng, (0.72, 0.70, 0.66))
    speck = value_noise(rng, u / F32(1.3), v / F32(1.3))
    chips = np.clip((speck - 0.78) * 6, 0, 1)
    bevel = 1 - F32(0.12) * np.exp(-(dg - g) / F32(2.0 * s / 256))
    img = base * (shades[iv, iu] * bevel * (1 - F32(0.45) * chips))[..., None]
    img = blend(img, jitter(rng, (0.35, 0.34, 0.33)), grout)
    return Scene((img * illumination(rng, h, w, 0.25)[..., None]).astype(F32), None, None)


def _leather(rng: Rng, h: int, w: int, s: int) -> Scene:
    cell = s * rng.uniform(0.03, 0.038)
    n = int(h * w / (cell * cell))
    seeds = np.full((h, w), 255, np.uint8)
    seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = 0
    dist = cv2.distanceTransform(seeds, cv2.DIST_L2, 5)
    bump = np.clip(1 - dist / F32(cell * 0.75), 0, 1) ** 0.6
    bump = cv2.GaussianBlur(bump, (3, 3), 0)
    diff, spec = shading(bump * F32(cell * 0.5), light_dir(rng, (0.5, 0.8)))
    base = jitter(rng, design_rng("synth_leather").choice([(0.36, 0.21, 0.12), (0.22, 0.22, 0.24)]), 0.05)
    yy, xx = grid(h, w)
    grain = value_noise(rng, xx / F32(1.5), yy / F32(1.5)) - 0.5
    img = base * (0.55 + 0.6 * diff + 0.15 * grain)[..., None] + F32(0.12) * spec[..., None]
    return Scene((img * illumination(rng, h, w, 0.2)[..., None]).astype(F32), None, None)


def _carpet(rng: Rng, h: int, w: int, s: int) -> Scene:
    u, v = rotated(h, w, rng.uniform(-0.05, 0.05))
    p = F32(s * rng.uniform(0.022, 0.027))
    wu = u + F32(0.35) * p * (value_noise(rng, u / F32(s * 0.08), v / F32(s * 0.08)) - 0.5)
    wv = v + F32(0.35) * p * (value_noise(rng, u / F32(s * 0.08), v / F32(s * 0.08)) - 0.5)
    row = np.floor(wv / p)
    bumps = (0.5 - 0.5 * np.cos(F32(2 * math.pi) * (wu / p + row * F32(0.5)))) * np.sin(F32(math.pi) * (wv / p - row))
    fibre = value_noise(rng, u / F32(1.1), v / F32(1.1))
    val = 0.35 + 0.45 * bumps + 0.3 * (fibre - 0.5)
    base = jitter(rng, design_rng("synth_carpet").choice([(0.55, 0.52, 0.48), (0.40, 0.45, 0.58)]), 0.04)
    return Scene((base * val[..., None] * illumination(rng, h, w, 0.25)[..., None]).astype(F32), None, None)


TEXTURES = {
    "synth_wood": _wood,
    "synth_fabric": _fabric,
    "synth_metal": _metal,
    "synth_mesh": _mesh,
    "synth_tile": _tile,
    "synth_leather": _leather,
    "synth_carpet": _carpet,
}
