"""Defect renderers with the statistics of real inspection defects: thin low-contrast cracks
(``hairline``), fine scratches, a cell or line of a periodic pattern shifted
(``shifted_cell``) or left out (``missing_cell``), stains, dirt specks, chips at an edge and
extra material.

Each takes (rng, scene, area in pixels, contrast, region) and returns (coverage, target
appearance, window), as the renderers of :mod:`~shards.synth.marks` do. Their contrast is an
amplitude in grey levels, from barely visible (about 12/255 at contrast 0.2, a few levels
above ``MIN_CHANGE``) to obvious (about 120/255 at contrast 1): :func:`amplitude`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from shards.synth.draw import F32, Cells, Rng, Scene, coverage, jitter, light_dir, value_noise, window
from shards.synth.shapes import MIN_CHANGE, blob, on_product, pick_center, stroke, walk


def amplitude(c: float) -> float:
    """The typical change (0..1) a defect of contrast ``c`` makes where it covers a pixel fully:
    13/255 at c = 0.2 (barely visible), 120/255 at c = 1 (obvious), log-linear between."""
    return 13 / 255 * (120 / 13) ** ((c - 0.2) / 0.8)


def _peak(diff: np.ndarray, a: np.ndarray) -> float:
    """The 90th percentile of a change over the defect's core (coverage >= 0.5)."""
    core = a >= 0.5
    return float(np.percentile(np.abs(diff).max(-1)[core], 90)) if core.any() else 0.0


def _toward(img: np.ndarray, full: np.ndarray, a: np.ndarray, amp: float) -> np.ndarray:
    """``img`` moved toward ``full`` (a replacement: shifted cells, the plain surface, the
    substrate) by as much as makes the change's 90th percentile over the defect's core ``amp``
    (at most all the way)."""
    diff = full - img
    return img + F32(min(1.0, amp / max(_peak(diff, a), 1e-6))) * diff


def _scale(scene: Scene) -> float:
    return max(scene.image.shape[:2]) / 256


def _noise_along(rng: Rng, a: np.ndarray, cell: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : a.shape[0], 0 : a.shape[1]].astype(F32)
    return value_noise(rng, xx / F32(cell), yy / F32(cell))


def _hairline(rng: Rng, scene: Scene, area: float, c: float, region: float):
    """A thin crack, one pixel wide, jagged, sometimes branched; darker than the surface."""
    h, w = scene.image.shape[:2]
    sc = _scale(scene)
    t = max(1, round(sc))
    length = area / (t + 0.5)
    cx, cy = pick_center(rng, scene, region)
    paths = [walk(rng, cx, cy, length * 0.8, 2 * sc, 0.35, 0.06)]
    k = rng.integers(len(paths[0]))
    branch = walk(rng, 0, 0, length * 0.2, 2 * sc, 0.4, 0.08)
    paths.append(branch - branch[0] + paths[0][k])
    a, win = stroke(paths, t, h, w)
    if a.size == 0:
        return a, a, win
    img = scene.image[win]
    target = img - F32(amplitude(c)) * (0.75 + 0.5 * _noise_along(rng, a, 6 * sc))[..., None]
    return on_product(a, win, scene), target, win


def _fine_scratch(rng: Rng, scene: Scene, area: float, c: float, region: float):
    """One to four fine, nearly straight, parallel scratches; bright (they catch the light) or dark."""
    h, w = scene.image.shape[:2]
    sc = _scale(scene)
    n = min(int(rng.integers(1, 5)), max(1, int(area / (12 * sc))))
    total = area / 1.6
    cx, cy = pick_center(rng, scene, region)
    ang = rng.uniform(0, math.pi)
    normal = np.array([-math.sin(ang), math.cos(ang)])
    paths = []
    for k in range(n):
        length = total / n * rng.uniform(0.6, 1.4)
        line = walk(rng, 0, 0, length, 3 * sc, 0.004, 0.004)
        d = line[-1] - line[0]
        rot = ang - math.atan2(d[1], d[0])
        rm = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
        offset = normal * (k - (n - 1) / 2) * rng.uniform(2, 6) * sc
        paths.append(line @ rm.T + (cx, cy) + offset + rng.normal(0, 3 * sc, 2) * (-normal[1], normal[0]))
    a, win = stroke(paths, 1, h, w)
    if a.size == 0:
        return a, a, win
    img = scene.image[win]
    sign = F32(1 if rng.random() < 0.65 else -1)
    target = img + sign * F32(amplitude(c)) * (0.75 + 0.5 * _noise_along(rng, a, 8 * sc))[..., None]
    return on_product(a, win, scene), target, win


def estimate_cells(rng: Rng, img: np.ndarray) -> Cells:
    """The cells of an image whose structure is not known: the first clear peak of its
    autocorrelation along x and along y (a random pitch where there is none)."""
    g = img.mean(-1) - img.mean()
    spec = np.fft.rfft2(g)
    ac = np.fft.irfft2(spec * np.conj(spec), s=g.shape)
    ac /= max(float(ac[0, 0]), 1e-9)
    pitches = []
    for prof in (ac[0, : g.shape[1] // 3], ac[: g.shape[0] // 3, 0]):
        peaks = [i for i in range(3, len(prof) - 1) if prof[i] >= prof[i - 1] and prof[i] > prof[i + 1] and prof[i] > 0.15]
        pitches.append(float(peaks[0]) if peaks else rng.uniform(0.05, 0.1) * min(g.shape))
    return Cells(pitches[0], pitches[1], 0.0, 0.0, 0.0)


def _box_size(area: float, pa: float, pc: float, limit: float) -> tuple[float, float]:
    """(length along the line, width across it) of a box of about ``area`` pixels on cells of
    pitch pa (along) x pc (across): part of one cell, a line of cells, or a block of lines."""
    if area < pa * pc:
        run = max(2.0, math.sqrt(area * pa / pc))
        return run, max(2.0, min(pc, area / run))
    cells = area / (pa * pc)
    rows = 1 if cells <= 8 else 2 if cells <= 24 else max(2, round(math.sqrt(cells / 3)))
    run = min(area / (pc * rows), limit)
    return pa * max(1, round(run / pa)), pc * rows


def _inside(cells: Cells, ua: float, va: float, hu: float, hv: float, h: int, w: int) -> tuple[float, float]:
    """The image position of a box centred at (ua, va) in cell coordinates, moved by whole
    cells so that the box lies inside the image where it fits."""
    cos, sin = math.cos(cells.angle), math.sin(cells.angle)
    ex, ey = abs(hu * cos) + abs(hv * sin), abs(hu * sin) + abs(hv * cos)
    mx, my = cells.x0 + ua * cos - va * sin, cells.y0 + ua * sin + va * cos
    dx = float(np.clip(mx, min(ex, w / 2), max(w - ex, w / 2))) - mx
    dy = float(np.clip(my, min(ey, h / 2), max(h - ey, h / 2))) - my
    ua += math.ceil(abs(dx * cos + dy * sin) / cells.pu) * cells.pu * math.copysign(1, dx * cos + dy * sin)
    va += math.ceil(abs(-dx * sin + dy * cos) / cells.pv) * cells.pv * math.copysign(1, -dx * sin + dy * cos)
    return cells.x0 + ua * cos - va * sin, cells.y0 + ua * sin + va * cos


def _cell_box(rng: Rng, scene: Scene, area: float, region: float):
    """A box aligned with the cells (part of a cell, a line of cells, or a block): the window,
    its pixel coordinates (x, y), the box's coverage and the cells."""
    h, w = scene.image.shape[:2]
    cells = scene.cells or estimate_cells(rng, scene.image)
    along_u = rng.random() < 0.5
    pa, pc = (cells.pu, cells.pv) if along_u else (cells.pv, cells.pu)
    run, wide = _box_size(area, pa, pc, 0.8 * min(h, w))
    cx, cy = pick_center(rng, scene, region)
    cos, sin = math.cos(cells.angle), math.sin(cells.angle)
    u0 = (cx - cells.x0) * cos + (cy - cells.y0) * sin
    v0 = -(cx - cells.x0) * sin + (cy - cells.y0) * cos
    lo_a = math.floor(((u0 if along_u else v0) - run / 2) / pa + 0.5) * pa
    lo_c = math.floor(((v0 if along_u else u0) - wide / 2) / pc + 0.5) * pc
    ua, va = (lo_a + run / 2, lo_c + wide / 2) if along_u else (lo_c + wide / 2, lo_a + run / 2)
    hu, hv = (run / 2, wide / 2) if along_u else (wide / 2, run / 2)
    mx, my = _inside(cells, ua, va, hu, hv, h, w)
    win, x, y = window(mx, my, math.hypot(hu, hv) + 2, h, w)
    u = x * F32(cos) + y * F32(sin)
    v = -x * F32(sin) + y * F32(cos)
    a = coverage(np.maximum(np.abs(u) - F32(hu), np.abs(v) - F32(hv)))
    return win, x + F32(mx), y + F32(my), a, cells


def _best_box(rng: Rng, scene: Scene, area: float, region: float, replace):
    """A cell box and what replaces it there, ``replace(win, x, y, cells)``: of up to three
    boxes, the first whose replacement changes it clearly (a box on blank cells changes nothing)."""
    best = None
    for _ in range(3):
        win, x, y, a, cells = _cell_box(rng, scene, area, region)
        full = replace(win, x, y, cells)
        score = _peak(full - scene.image[win], a)
        if best is None or score > best[0]:
            best = (score, win, a, full)
        if score >= 3 * MIN_CHANGE:
            break
    return best[1], best[2], best[3]


def _shifted_cell(rng: Rng, scene: Scene, area: float, c: float, region: float):
    """A line or run of cells of a periodic pattern displaced by a fraction of the pitch."""
    frac = (0.2 + 0.3 * c) * (1 if rng.random() < 0.5 else -1)
    axis = rng.random() < 0.5

    def shifted(win, x, y, cells: Cells) -> np.ndarray:
        d = frac * (cells.pu if axis else cells.pv)
        cos, sin = math.cos(cells.angle), math.sin(cells.angle)
        dx, dy = (d * cos, d * sin) if axis else (-d * sin, d * cos)
        return cv2.remap(scene.image, x + F32(dx), y + F32(dy), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)

    win, a, full = _best_box(rng, scene, area, region, shifted)
    return on_product(a, win, scene), _toward(scene.image[win], full, a, amplitude(c)), win


def _missing_cell(rng: Rng, scene: Scene, area: float, c: float, region: float):
    """A line or run of cells of a periodic pattern left out: the plain surface shows (the
    local mean over a cell where the product has no plain surface)."""

    def plain(win, x, y, cells: Cells) -> np.ndarray:
        if scene.plain is not None:
            return scene.plain[win]
        k = max(3, int(round(max(cells.pu, cells.pv))) | 1)
        return cv2.blur(scene.image, (k, k), borderType=cv2.BORDER_REFLECT101)[win]

    win, a, full = _best_box(rng, scene, area, region, plain)
    return on_product(a, win, scene), _toward(scene.image[win], full, a, amplitude(c)), win


def _stain(rng: Rng, scene: Scene, area: float, c: float, region: float):
    """A dried stain: an irregular patch, tinted, darkest at its rim (a drying ring)."""
    h, w = scene.image.shape[:2]
    cx, cy = pick_center(rng, scene, region)
    a, win, depth, x, y = blob(rng, cx, cy, area, h, w, 0.3, rng.uniform(1.0, 1.6))
    tint = jitter(rng, [(0.55, 0.42, 0.25), (0.35, 0.35, 0.32), (0.62, 0.58, 0.40)][rng.integers(3)], 0.05)
    absorb = (1 - tint) / F32(max(float((1 - tint).max()), 1e-3))
    rim = np.exp(-((depth / F32(0.15)) ** 2))
    cell = F32(max(math.sqrt(area) * 0.4, 1.5))
    profile = (0.8 + 0.6 * rim) * (0.75 + 0.5 * value_noise(rng, x / cell, y / cell))
    img = scene.image[win]
    target = img - F32(amplitude(c)) * profile[..., None] * absorb
    return on_product(a, win, scene), target, win


def _dirt(rng: Rng, scene: Scene, area: float, c: float, region: float):
    """Dirt: one to sixty specks a pixel or a few across, scattered around a point; mostly dark."""
    h, w = scene.image.shape[:2]
    sc = _scale(scene)
    radii = rng.uniform(0.7, 2.4, 60) * sc
    n = int(np.clip(np.searchsorted(np.cumsum(math.pi * radii**2 + 2 * radii), area) + 1, 1, 60))
    radii = radii[:n]
    spread = (3 + 5 * math.sqrt(n)) * sc
    cx, cy = pick_center(rng, scene, region)
    offs = rng.normal(0, spread / 2, (n, 2))
    win, x, y = window(cx, cy, float(np.abs(offs).max() + radii.max()) + 3, h, w)
    d = np.sqrt((x[None] - offs[:, 0, None, None].astype(F32)) ** 2
                + (y[None] - offs[:, 1, None, None].astype(F32)) ** 2) - radii[:, None, None].astype(F32)
    a = coverage(d.min(0))
    img = scene.image[win]
    sign = F32(-1 if rng.random() < 0.8 else 1)
    target = img + sign * F32(amplitude(c) * rng.uniform(0.8, 1.25))
    return on_product(a, win, scene), target, win


def _edge_point(rng: Rng, scene: Scene, region: float) -> tuple[float, float]:
    """A point on an edge: the product's outline, or one of the strongest edges of its pattern."""
    if scene.obj is not None:
        return pick_center(rng, scene, region, edge=True)
    h, w = scene.image.shape[:2]
    y0, x0 = int(h * (1 - region) / 2), int(w * (1 - region) / 2)
    g = scene.image[y0 : h - y0, x0 : w - x0].mean(-1)
    mag = np.abs(cv2.Sobel(g, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(g, cv2.CV_32F, 0, 1))
    flat = mag.ravel()
    top = np.argpartition(flat, -max(1, flat.size // 30))[-max(1, flat.size // 30):]
    i = int(top[rng.integers(len(top))])
    return float(i % mag.shape[1] + x0), float(i // mag.shape[1] + y0)


def _chip(rng: Rng, scene: Scene, area: float, c: float, region: float):
    """A chip at an edge: a piece broken off the outline (the background shows), or flaked off
    a coating or a pattern's edge (the substrate shows), with a lit fracture rim."""
    h, w = scene.image.shape[:2]
    cx, cy = _edge_point(rng, scene, region)
    grow = 1.7 if scene.obj is not None else 1.0
    a, win, depth, x, y = blob(rng, cx, cy, area * grow, h, w, 0.35, rng.uniform(1.0, 1.6))
    img = scene.image[win]
    rim = np.exp(-((depth / F32(0.2)) ** 2))[..., None]
    amp = amplitude(c)
    if scene.background is not None:
        base = scene.background[win]
    else:
        base = np.full_like(img, 0.8 if float(img.mean()) < 0.5 else 0.2)
    base = base + F32(amp) * rim * F32(1 if float(base.mean()) < 0.6 else -1)
    return on_product(a, win, scene), _toward(img, base, a, amp), win


def _extra_material(rng: Rng, scene: Scene, area: float, c: float, region: float):
    """Extra material: a lump of the product's own material (copied from elsewhere on it), raised
    and lit from one side; on an object often at its outline (a burr), reaching past it."""
    h, w = scene.image.shape[:2]
    edge = scene.obj is not None and rng.random() < 0.5
    cx, cy = pick_center(rng, scene, region, edge=edge)
    a, win, depth, x, y = blob(rng, cx, cy, area, h, w, 0.25, rng.uniform(1.0, 2.0))
    r = math.sqrt(area / math.pi)
    off = rng.uniform(2, 4) * r * np.array([math.cos(t := rng.uniform(0, 2 * math.pi)), math.sin(t)])
    src = cv2.remap(scene.image, x + F32(cx + off[0]), y + F32(cy + off[1]), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REFLECT101)
    bump = depth * depth * (3 - 2 * depth)
    gy, gx = np.gradient(bump * F32(max(r, 1.0)))
    light = light_dir(rng)
    amp = amplitude(c)
    shade = np.clip(gx * light[0] + gy * light[1], -1, 1) * F32(2 * amp)
    lump = src + (shade + F32(amp * (0.6 if float(src.mean()) < 0.5 else -0.6)))[..., None]
    return a, _toward(scene.image[win], lump, a, amp), win


CELL_TYPES = ("shifted_cell", "missing_cell")
"""The types that interrupt a periodic pattern: drawn only for periodic products (and the user's images)."""
FLAWS = {
    "hairline": _hairline,
    "shifted_cell": _shifted_cell,
    "stain": _stain,
    "chip": _chip,
    "fine_scratch": _fine_scratch,
    "missing_cell": _missing_cell,
    "dirt": _dirt,
    "extra_material": _extra_material,
}
