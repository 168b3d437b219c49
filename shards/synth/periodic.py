"""Periodic products modelled on inspection imagery: a lattice, a fine twill weave, a halftone
print, a perforated sheet, dies on a wafer and a printed label.

Each renderer takes (rng, height, width, feature scale) and returns a :class:`Scene` with its
:class:`Cells` (so a defect can shift or leave out a cell) and, where the product has one, the
``plain`` surface that shows where a cell is left out. Brightness varies across the part
(:func:`~shards.synth.draw.lighting`). Grey-level products have three equal channels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from shards.synth.draw import (
    F32,
    Cells,
    Rng,
    Scene,
    backdrop,
    coarse,
    coverage,
    design_rng,
    fbm,
    grey3,
    jitter,
    lighting,
    rotated,
    upsample,
    value_noise,
)


def _lattice_coords(rng: Rng, h: int, w: int, pu: float, pv: float, tilt: float):
    """Rotated coordinates in cell units, the fractional position in a cell and the cells."""
    ang = rng.uniform(-tilt, tilt)
    x0, y0 = rng.uniform(0, pu), rng.uniform(0, pv)
    u, v = rotated(h, w, ang, x0, y0)
    fu, fv = u / F32(pu), v / F32(pv)
    return fu, fv, Cells(pu, pv, ang, x0, y0)


def _lattice(rng: Rng, h: int, w: int, s: int) -> Scene:
    """A metal grating: flat bars in a square grid, rounded edges, dark holes (grey)."""
    p = s * rng.uniform(0.065, 0.08)
    fu, fv, cells = _lattice_coords(rng, h, w, p, p, 0.05)
    half = F32(p * rng.uniform(0.13, 0.17))
    du = np.abs(fu - np.round(fu)) * F32(p)
    dv = np.abs(fv - np.round(fv)) * F32(p)
    bar = np.maximum(coverage(du - half), coverage(dv - half))
    prof = np.sqrt(np.clip(1 - (np.minimum(du, dv) / half) ** 2, 0, 1))
    grain = value_noise(rng, fu * F32(p / 1.5), fv * F32(p / 1.5))
    metal = F32(rng.uniform(0.55, 0.68)) * (0.6 + 0.4 * prof + 0.1 * (grain - 0.5))
    hole = F32(rng.uniform(0.05, 0.1)) * (0.8 + 0.4 * value_noise(rng, fu * F32(2), fv * F32(2)))
    gain = lighting(rng, h, w, s)
    img = (hole + (metal - hole) * bar) * gain
    plain = F32(rng.uniform(0.55, 0.68)) * (0.85 + 0.1 * (grain - 0.5)) * gain
    return Scene(grey3(img), None, None, grey=True, cells=cells, plain=grey3(plain))


def _weave(rng: Rng, h: int, w: int, s: int) -> Scene:
    """A fine 2/2 twill: yarns a few pixels wide, the diagonal rib, fibre streaks, uneven yarns."""
    p = s * rng.uniform(0.013, 0.018)
    fu, fv, cells = _lattice_coords(rng, h, w, p, p, 0.04)
    iu, iv = np.floor(fu), np.floor(fv)
    ru, rv = fu - iu, fv - iv
    top = ((iu + iv) % 4) < 2  # the warp floats over two wefts, shifted by one per row: a twill
    pu, pv = np.sin(F32(math.pi) * ru), np.sin(F32(math.pi) * rv)
    height = np.where(top, pu * (0.6 + 0.4 * pv), pv * (0.6 + 0.4 * pu))
    cols = (iu - iu.min()).astype(np.int32)
    rows = (iv - iv.min()).astype(np.int32)
    slub_u = (1 + rng.normal(0, 0.06, int(cols.max()) + 1)).astype(F32)
    slub_v = (1 + rng.normal(0, 0.06, int(rows.max()) + 1)).astype(F32)
    fibre = value_noise(rng, fu * F32(0.35), fv * F32(3.0))
    val = (0.3 + 0.6 * height + 0.18 * (fibre - 0.5)) * np.where(top, slub_u[cols], slub_v[rows])
    pair = design_rng("synth_weave").choice([((0.16, 0.24, 0.45), (0.78, 0.76, 0.70)), ((0.45, 0.12, 0.10), (0.70, 0.62, 0.50))])
    warp_c, weft_c = jitter(rng, pair[0], 0.04), jitter(rng, pair[1], 0.04)
    col = np.where(top[..., None], warp_c, weft_c)
    gain = lighting(rng, h, w, s, 0.2)
    img = col * (val * gain)[..., None]
    plain = ((warp_c + weft_c) / 2 * F32(0.55)) * gain[..., None]
    return Scene(img.astype(F32), None, None, cells=cells, plain=plain.astype(F32))


def _halftone(rng: Rng, h: int, w: int, s: int) -> Scene:
    """A halftone print: cyan, magenta, yellow and black dot screens at their usual angles over
    a smooth printed picture, on paper."""
    cx, cy, _, _ = coarse(h, w, 4)
    p = s * rng.uniform(0.02, 0.028)
    base = rng.uniform(-0.03, 0.03)
    paper = jitter(rng, (0.95, 0.94, 0.90), 0.02)
    img = np.broadcast_to(paper, (h, w, 3)).copy()
    absorb = {0: (0.85, 0.1, 0.05), 1: (0.1, 0.85, 0.15), 2: (0.02, 0.08, 0.8), 3: (0.8, 0.8, 0.8)}
    cells = None
    picture = fbm(rng, cx / F32(s * 0.35), cy / F32(s * 0.35), 3)  # the printed picture's darkness
    hue = rng.uniform(0.3, 0.7, 3).astype(F32)
    for k, ang in enumerate((15, 75, 0, 45)):
        tint = fbm(rng, cx / F32(s * 0.5), cy / F32(s * 0.5), 2) - 0.5
        tone = np.clip(picture * 1.2 - 0.65, 0, 0.7) if k == 3 else np.clip(picture * hue[k] + 0.6 * tint, 0.02, 0.8)
        tone = upsample(tone.astype(F32), h, w)
        theta = math.radians(ang) + base
        x0, y0 = rng.uniform(0, p, 2)
        u, v = rotated(h, w, theta, x0, y0)
        du = (u / F32(p) - np.floor(u / F32(p)) - F32(0.5)) * F32(p)
        dv = (v / F32(p) - np.floor(v / F32(p)) - F32(0.5)) * F32(p)
        ink = coverage(np.sqrt(du * du + dv * dv) - F32(p) * np.sqrt(tone / F32(math.pi)))
        img *= 1 - ink[..., None] * np.asarray(absorb[k], F32)
        if k == 3:
            cells = Cells(p, p, theta, x0, y0)
    plain = np.broadcast_to(paper, (h, w, 3)) * F32(0.97)
    gain = lighting(rng, h, w, s, 0.15)[..., None]
    return Scene((img * gain).astype(F32), None, None, cells=cells, plain=(plain * gain).astype(F32))


def _perforated(rng: Rng, h: int, w: int, s: int) -> Scene:
    """A perforated sheet: round holes in a square pitch, brushed metal, lit hole edges (grey)."""
    p = s * rng.uniform(0.085, 0.1)
    fu, fv, cells = _lattice_coords(rng, h, w, p, p, 0.03)
    du = (fu - np.floor(fu) - F32(0.5)) * F32(p)
    dv = (fv - np.floor(fv) - F32(0.5)) * F32(p)
    d = np.sqrt(du * du + dv * dv)
    r = F32(p * rng.uniform(0.27, 0.33))
    streak = value_noise(rng, fu * F32(p / (s * 0.2)), fv * F32(p / 0.8))
    sheet = F32(rng.uniform(0.58, 0.7)) * (0.88 + 0.2 * (streak - 0.5))
    light = rng.uniform(0, 2 * math.pi)
    facing = (du * F32(math.cos(light)) + dv * F32(math.sin(light))) / (d + F32(1e-3))
    bevel = np.exp(-((d - r) / F32(max(1.0, p * 0.05))) ** 2) * (d > r)
    metal = sheet * (1 + F32(0.35) * bevel * facing)
    inside = F32(rng.uniform(0.04, 0.09)) + F32(0.12) * np.clip(-facing, 0, 1) * np.clip(d / r, 0, 1) ** 3
    gain = lighting(rng, h, w, s)
    img = (inside + (metal - inside) * coverage(r - d)) * gain
    return Scene(grey3(img), None, None, grey=True, cells=cells, plain=grey3(sheet * gain))


@lru_cache(maxsize=2)
def _die_art() -> np.ndarray:
    """The fixed artwork of one die (64 x 64 RGB): pad ring, memory blocks, logic, wiring."""
    d = design_rng("synth_wafer")
    art = np.zeros((64, 64, 3), np.uint8)
    art[:] = (70, 96, 120)
    cv2.rectangle(art, (3, 3), (60, 60), (92, 110, 132), -1)
    for k in range(6, 58, 6):  # bond pads along the four edges
        for x, y in ((k, 5), (k, 57), (5, k), (57, k)):
            cv2.rectangle(art, (x - 1, y - 1), (x + 1, y + 1), (200, 190, 150), -1)
    for _ in range(4):  # memory arrays: striped blocks
        x0, y0 = (int(t) for t in d.integers(10, 40, 2))
        bw, bh = (int(t) for t in d.integers(8, 16, 2))
        for yy in range(y0, y0 + bh, 2):
            cv2.line(art, (x0, yy), (x0 + bw, yy), (40, 70, 110), 1)
    for _ in range(10):
        x0, y0 = (int(t) for t in d.integers(9, 52, 2))
        cv2.line(art, (x0, y0), (x0 + int(d.integers(-8, 9)), y0), (150, 140, 110), 1)
    art = cv2.GaussianBlur(art.astype(F32) / 255, (3, 3), 0.6)
    art.setflags(write=False)
    return art


def _wafer(rng: Rng, h: int, w: int, s: int) -> Scene:
    """Dies on a wafer near its edge: a grid of dies with streets between them, a thin-film
    tint that drifts across the wafer, the dark chuck beyond the wafer's edge."""
    pu = s * rng.uniform(0.17, 0.2)
    pv = pu * float(design_rng("synth_wafer").uniform(0.8, 0.9))
    fu, fv, cells = _lattice_coords(rng, h, w, pu, pv, 0.02)
    ru, rv = fu - np.floor(fu), fv - np.floor(fv)
    die = cv2.remap(_die_art(), ru * F32(63), rv * F32(63), cv2.INTER_LINEAR)
    street = F32(0.035)
    inner = np.minimum(coverage((street - ru) * F32(pu)), coverage((ru - 1 + street) * F32(pu)))
    inner = np.minimum(inner, np.minimum(coverage((street - rv) * F32(pv)), coverage((rv - 1 + street) * F32(pv))))
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    theta = rng.uniform(0, 2 * math.pi)
    radius = 2.2 * s
    off = radius - rng.uniform(0.3, 0.45) * s
    cx, cy = w / 2 - math.cos(theta) * off, h / 2 - math.sin(theta) * off
    rho = np.sqrt((xx - F32(cx)) ** 2 + (yy - F32(cy)) ** 2)
    phase = rng.uniform(0, 2 * math.pi, 3)
    tint = 1 + F32(0.12) * np.stack([np.sin(rho / F32(0.6 * s) + F32(ph)) for ph in phase], -1)
    bare = jitter(rng, (0.50, 0.52, 0.58), 0.03) * tint
    edge_die = coverage(rho - F32(radius - 0.06 * s))  # partial dies at the edge are not printed
    img = bare + (die * tint - bare) * (inner * edge_die)[..., None]
    gain = lighting(rng, h, w, s, 0.25)[..., None]
    alpha = coverage(rho - F32(radius))
    bg = backdrop(rng, h, w, (0.07, 0.07, 0.08), 0.3)
    obj = img * gain
    return Scene((bg + (obj - bg) * alpha[..., None]).astype(F32), alpha, bg, cells=cells,
                 plain=(bare * gain).astype(F32))


GLYPHS = 24
GLYPH_PX = 6
_STROKES = (  # on a 5 x 7 grid: bars, diagonals, bowls; a glyph is two or three of them
    ((0, 0), (0, 6)), ((4, 0), (4, 6)), ((2, 0), (2, 6)), ((0, 0), (4, 0)), ((0, 3), (4, 3)), ((0, 6), (4, 6)),
    ((0, 6), (4, 0)), ((0, 0), (4, 6)), ((0, 0), (3, 0), (4, 1), (4, 2), (3, 3), (0, 3)),
    ((1, 0), (3, 0), (4, 1), (4, 5), (3, 6), (1, 6), (0, 5), (0, 1), (1, 0)), ((0, 0), (2, 3), (4, 0)), ((4, 3), (4, 6)),
)


@lru_cache(maxsize=2)
def _glyph_atlas() -> np.ndarray:
    """The printed characters (a fixed set of glyphs drawn from strokes on a 5 x 7 grid, then a
    blank), each in a slot with a margin so that the ink of one never reaches the next."""
    d = design_rng("synth_label")
    k = GLYPH_PX
    slot = 7 * k
    atlas = np.zeros((9 * k, slot * (GLYPHS + 1)), np.uint8)
    for g in range(GLYPHS):
        for i in d.choice(len(_STROKES), int(d.integers(2, 4)), replace=False):
            pts = (np.array(_STROKES[i], float) * k + (g * slot + 1.5 * k, 1.5 * k)) * 16
            cv2.polylines(atlas, [pts.round().astype(np.int32)], False, 255, max(1, int(0.9 * k)), cv2.LINE_AA, 4)
    out = cv2.GaussianBlur(atlas.astype(F32) / 255, (0, 0), k * 0.25)
    out.setflags(write=False)
    return out


def _label(rng: Rng, h: int, w: int, s: int) -> Scene:
    """Printed text on a label: lines of characters in a fixed pitch, ragged line ends, paper
    fibres, slightly uneven ink (grey)."""
    pu = s * rng.uniform(0.045, 0.055)
    pv = pu * rng.uniform(1.5, 1.7)
    fu, fv, cells = _lattice_coords(rng, h, w, pu, pv, 0.02)
    iu, iv = np.floor(fu), np.floor(fv)
    cols = (iu - iu.min()).astype(np.int32)
    rows = (iv - iv.min()).astype(np.int32)
    nr, nc = int(rows.max()) + 1, int(cols.max()) + 1
    text = rng.integers(0, GLYPHS, (nr, nc))
    text[rng.random((nr, nc)) < 0.12] = GLYPHS  # spaces
    ends = rng.integers(nc // 2, nc + 1, nr)
    text[np.arange(nc)[None, :] >= ends[:, None]] = GLYPHS
    gx = (fu - iu - F32(0.15)) / F32(0.7)
    gy = (fv - iv - F32(0.12)) / F32(0.7)
    inside = (gx >= 0) & (gx < 1) & (gy >= 0) & (gy < 1)
    glyph = np.where(inside, text[rows, cols], GLYPHS)
    k = GLYPH_PX
    ax = (glyph * 7 * k + F32(k) + np.clip(gx, 0, 1) * F32(5 * k)).astype(F32)
    ink = cv2.remap(_glyph_atlas(), ax, (F32(k) + np.clip(gy, 0, 1) * F32(7 * k)).astype(F32), cv2.INTER_LINEAR)
    paper = F32(rng.uniform(0.8, 0.9)) * (0.95 + 0.08 * (value_noise(rng, fu * F32(pu / 3), fv * F32(pv / 3)) - 0.5))
    dark = F32(rng.uniform(0.08, 0.16)) + F32(0.08) * value_noise(rng, fu * F32(pu / 6), fv * F32(pv / 6))
    gain = lighting(rng, h, w, s, 0.2)
    img = (paper + (dark - paper) * ink) * gain
    return Scene(grey3(img), None, None, grey=True, cells=cells, plain=grey3(paper * gain))


PERIODIC = {
    "synth_lattice": _lattice,
    "synth_weave": _weave,
    "synth_halftone": _halftone,
    "synth_perforated": _perforated,
    "synth_wafer": _wafer,
    "synth_label": _label,
}
"""The periodic products; every one returns its cells."""
