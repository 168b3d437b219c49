"""The eight classic defect renderers (the pretrain family's): scratch, crack, pit, contamination,
missing piece, foreign object, deformation and abrasion.

Each takes (rng, scene, area in pixels, contrast, region) and returns (coverage, target
appearance, window): the defect changes the scene to ``I + a (T - I)`` inside the window.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from shards.synth.draw import F32, Rng, Scene, jitter, light_dir, value_noise
from shards.synth.shapes import blob, on_product, pick_center, stroke, walk


def _scratch(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    scale = max(h, w) / 256
    t = max(1, round(rng.uniform(1.0, 2.5) * scale))
    total = area / (t + 1)
    n = max(1, math.ceil(total / (0.6 * max(h, w))))
    cx, cy = pick_center(rng, scene, region)
    base = walk(rng, cx, cy, total / n, 3 * scale, 0.02, 0.05)
    normal = np.array([-(base[-1, 1] - base[0, 1]), base[-1, 0] - base[0, 0]])
    normal /= np.linalg.norm(normal) + 1e-9
    paths = [base + normal * (k - (n - 1) / 2) * 3 * (t + 1) for k in range(n)]
    a, win = stroke(paths, t, h, w)
    img = scene.image[win]
    tone = 0.95 if rng.random() < 0.6 else 0.08
    target = img + F32(c) * (F32(tone) - img)
    return on_product(a, win, scene), target, win


def _crack(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    scale = max(h, w) / 256
    t = max(1, round(rng.uniform(1.0, 2.0) * scale))
    total = area / (t + 1)
    cx, cy = pick_center(rng, scene, region)
    main = walk(rng, cx, cy, total * 0.7, 2.5 * scale, 0.6, 0.08)
    k = rng.integers(len(main))
    branch = walk(rng, 0, 0, total * 0.3, 2.5 * scale, 0.6, 0.1)
    branch = branch - branch[0] + main[k]
    a, win = stroke([main, branch], t, h, w)
    img = scene.image[win]
    target = img + F32(c) * (img * F32(0.12) - img)
    return on_product(a, win, scene), target, win


def _pit(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    cx, cy = pick_center(rng, scene, region)
    a, win, depth, x, y = blob(rng, cx, cy, area, h, w, 0.08, rng.uniform(1.0, 1.3))
    light = light_dir(rng)
    rho = np.sqrt(x * x + y * y) + F32(1e-6)
    facing = np.clip((x * light[0] + y * light[1]) / rho, 0, 1)
    img = scene.image[win]
    dark = img * (1 - F32(c) * (F32(0.45) + F32(0.35) * depth))[..., None]
    target = dark + (F32(c) * F32(0.35) * facing * (1 - depth))[..., None]
    return on_product(a, win, scene), np.clip(target, 0, 1), win


def _contamination(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    cx, cy = pick_center(rng, scene, region)
    a, win, depth, x, y = blob(rng, cx, cy, area, h, w, 0.45, rng.uniform(1.0, 2.0))
    stains = [(0.25, 0.17, 0.09), (0.06, 0.06, 0.06), (0.70, 0.62, 0.30), (0.85, 0.85, 0.82)]
    colour = jitter(rng, stains[rng.integers(len(stains))], 0.05)
    cell = F32(max(math.sqrt(area) * 0.3, 1.0))
    opacity = F32(c) * (0.55 + 0.45 * value_noise(rng, x / cell, y / cell))
    img = scene.image[win]
    target = img + (colour - img) * opacity[..., None]
    return on_product(a, win, scene), target, win


def _missing(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    on_edge = scene.obj is not None
    cx, cy = pick_center(rng, scene, region, edge=on_edge)
    a, win, depth, x, y = blob(rng, cx, cy, area * (1.8 if on_edge else 1.0), h, w, 0.25, rng.uniform(1.0, 1.8))
    if scene.background is not None:
        target = scene.background[win]
    else:
        cell = F32(2.0)
        backing = F32(rng.uniform(0.05, 0.12)) * (0.8 + 0.4 * value_noise(rng, x / cell, y / cell))
        target = np.repeat(backing[..., None], 3, -1) * (0.6 + 0.4 * (1 - depth))[..., None]
    return on_product(a, win, scene), target.astype(F32), win


def _foreign(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    scale = max(h, w) / 256
    cx, cy = pick_center(rng, scene, region)
    hue = rng.uniform(0, 180)
    hsv = np.uint8([[[hue, rng.uniform(150, 255), rng.uniform(90, 230)]]])
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(F32) / 255
    if rng.random() < 0.2:
        colour = np.full(3, rng.uniform(0.03, 0.15), F32)
    if rng.random() < 0.5:  # a fibre or hair lying on the product
        t = max(1, round(scale))
        a, win = stroke([walk(rng, cx, cy, area / (t + 1), 2.5 * scale, 0.05, 0.12)], t, h, w)
        img = scene.image[win]
        return a, img + F32(0.5 + 0.5 * c) * (colour - img), win
    a, win, depth, x, y = blob(rng, cx, cy, area, h, w, 0.4, rng.uniform(1.0, 1.6))
    img = scene.image[win]
    particle = colour * (0.65 + 0.35 * depth)[..., None]
    return a, img + F32(0.5 + 0.5 * c) * (particle - img), win


def _deformation(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    cx, cy = pick_center(rng, scene, region)
    a, win, depth, x, y = blob(rng, cx, cy, area, h, w, 0.1, rng.uniform(1.0, 1.6))
    bump = depth * depth * (3 - 2 * depth)
    k = F32(0.45 * c) * (1 if rng.random() < 0.5 else -1)
    mx = (x * (1 - k * bump) + F32(cx)).astype(F32)
    my = (y * (1 - k * bump) + F32(cy)).astype(F32)
    warped = cv2.remap(scene.image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    r = math.sqrt(area / math.pi)
    gy, gx = np.gradient(bump * F32(r))
    light = light_dir(rng)
    shade = 1 + F32(0.35 * c) * np.sign(k) * np.clip(gx * light[0] + gy * light[1], -1, 1)
    return on_product(a, win, scene), np.clip(warped * shade[..., None], 0, 1), win


def _abrasion(rng: Rng, scene: Scene, area: float, c: float, region: float):
    h, w = scene.image.shape[:2]
    cx, cy = pick_center(rng, scene, region)
    a, win, depth, x, y = blob(rng, cx, cy, area, h, w, 0.35, rng.uniform(1.2, 2.5))
    img = scene.image[win]
    sigma = rng.uniform(1.0, 2.5) * max(h, w) / 256
    blurred = cv2.GaussianBlur(img, (0, 0), sigma)
    ang = rng.uniform(0, math.pi)
    u = x * F32(math.cos(ang)) + y * F32(math.sin(ang))
    v = -x * F32(math.sin(ang)) + y * F32(math.cos(ang))
    streak = value_noise(rng, u / F32(max(math.sqrt(area) * 0.5, 2.0)), v / F32(0.8)) - 0.5
    target = blurred * F32(1 + 0.25 * c) + (F32(0.15 * c) * streak)[..., None]
    return on_product(a, win, scene), np.clip(target, 0, 1), win


MARKS = {
    "scratch": _scratch,
    "crack": _crack,
    "pit": _pit,
    "contamination": _contamination,
    "missing": _missing,
    "foreign": _foreign,
    "deformation": _deformation,
    "abrasion": _abrasion,
}
