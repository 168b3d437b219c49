"""Defects of the synthetic data, rendered with exact masks, and the plan of a class's defects.

A defect is rendered as a coverage field ``a`` (0 outside the region it touches, up to 1
inside, a one-pixel ramp at its border) and a target appearance ``T``; the defective image
is ``I + a * (T - I)``. The mask is ``a >= MASK_LEVEL``: it comes from the renderer, and
pixels outside it are changed only in the anti-aliasing ring next to it.

The renderers: the eight classic ones in :mod:`~shards.synth.marks` (``CLASSIC_TYPES``), the eight
modelled on real inspection defects in :mod:`~shards.synth.flaws`;
:mod:`~shards.synth.families` gives every type to one family.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from shards.synth.draw import F32, Rng, Scene
from shards.synth.flaws import FLAWS
from shards.synth.marks import MARKS
from shards.synth.shapes import MASK_LEVEL, MIN_CHANGE  # noqa: F401 - part of this module's interface


@dataclass(frozen=True)
class DefectSpec:
    """One defect to render: type, target area (fraction of the output image) and contrast."""

    kind: str
    area: float
    contrast: float


CLASSIC_TYPES = ("scratch", "crack", "pit", "contamination", "missing", "foreign", "deformation", "abrasion")
"""The eight classic defect types (the pretrain family's)."""
INSPECTION_TYPES = ("hairline", "shifted_cell", "stain", "chip", "fine_scratch", "missing_cell", "dirt", "extra_material")
"""The defect types modelled on real inspection defects."""
DEFECT_TYPES = CLASSIC_TYPES + INSPECTION_TYPES
"""Every defect type."""
REALIAD_CODES = {
    "pit": "AK",
    "deformation": "BX",
    "abrasion": "CH",
    "scratch": "HS",
    "crack": "PS",
    "missing": "QS",
    "foreign": "YW",
    "contamination": "ZW",
    "hairline": "HL",
    "shifted_cell": "SC",
    "stain": "ST",
    "chip": "CP",
    "fine_scratch": "FS",
    "missing_cell": "MC",
    "dirt": "DT",
    "extra_material": "EM",
}
"""Real-IAD's two-letter defect codes (AK pit, BX deformation, CH abrasion, HS scratch, PS damage,
QS missing parts, YW foreign objects, ZW contamination) for the classic types; codes of the same
shape, not Real-IAD's, for the new ones."""
AREA_MIN, AREA_MAX = 0.0002, 0.12
"""The classic types: areas drawn log-uniformly in this range (fractions of the image area)."""
AREA_RANGE = {
    "pit": (0.0002, 0.01),
    "foreign": (0.0002, 0.02),
    "scratch": (0.0003, 0.015),
    "crack": (0.0005, 0.03),
    "contamination": (0.0005, 0.12),
    "deformation": (0.003, 0.10),
    "abrasion": (0.003, 0.12),
    "missing": (0.002, 0.12),
    "hairline": (0.0002, 0.006),
    "shifted_cell": (0.0005, 0.06),
    "stain": (0.001, 0.12),
    "chip": (0.0003, 0.02),
    "fine_scratch": (0.0002, 0.008),
    "missing_cell": (0.0005, 0.06),
    "dirt": (0.0001, 0.01),
    "extra_material": (0.001, 0.12),
}
"""The areas each defect type can take: tiny pits, specks and fibres, large stains and missing pieces.
A set of types draws its areas log-uniformly between the smallest and the largest of its types."""
MIN_AREA_PX = 6


def plan_defects(rng: Rng, count: int, types: tuple[str, ...] = CLASSIC_TYPES) -> list[DefectSpec]:
    """Defects of ``types`` for ``count`` abnormal images of a class: areas stratified over the
    log range of the types (so small and large ones both occur in every class), the rarest
    compatible type for each, about a third of them subtle (low contrast)."""
    lo, hi = min(AREA_RANGE[t][0] for t in types), max(AREA_RANGE[t][1] for t in types)
    u = (rng.permutation(count) + rng.random(count)) / max(count, 1)
    areas = lo * (hi / lo) ** u
    used = dict.fromkeys(types, 0)
    specs = []
    for area in areas:
        fits = [t for t in types if AREA_RANGE[t][0] <= area <= AREA_RANGE[t][1]]
        if not fits:  # the types leave a gap in the range: the one whose range comes closest
            fits = [min(types, key=lambda t: max(AREA_RANGE[t][0] / area, area / AREA_RANGE[t][1]))]
        least = min(used[t] for t in fits)
        kind = str(rng.choice([t for t in fits if used[t] == least]))
        used[kind] += 1
        contrast = rng.uniform(0.2, 0.4) if rng.random() < 0.35 else rng.uniform(0.55, 1.0)
        specs.append(DefectSpec(kind, float(area), float(contrast)))
    return specs


_DEFECTS = {**MARKS, **FLAWS}


def apply_defect(scene: Scene, spec: DefectSpec, rng: Rng, ref_size: int | tuple[int, int],
                 region: float) -> tuple[np.ndarray, np.ndarray]:
    """Render a defect into the scene: (defective image, coverage field a in [0, 1]).

    The image changes only where ``a > 0``: the mask ``a >= MASK_LEVEL`` and a ring at most one
    pixel wide around it; by at least ``MIN_CHANGE`` (before weighting by ``a``) wherever ``a > 0``.
    ``spec.area`` is a fraction of the output image's area: ``ref_size**2``, or height x width.
    A grey-level scene stays grey (the target's channels are averaged).
    """
    h, w = scene.image.shape[:2]
    rh, rw = (ref_size, ref_size) if isinstance(ref_size, int) else ref_size
    area = max(float(MIN_AREA_PX), spec.area * rh * rw)
    a, target, win = _DEFECTS[spec.kind](rng, scene, area, spec.contrast, region)
    out = scene.image.copy()
    cov = np.zeros((h, w), F32)
    if a.size == 0:
        return out, cov
    ring = cv2.dilate((a >= MASK_LEVEL).astype(np.uint8), np.ones((3, 3), np.uint8))
    a = a * ring  # the anti-aliasing ring is at most one pixel wide
    img = out[win]
    if scene.grey:
        target = np.repeat(target.mean(-1, keepdims=True), 3, -1)
    d = np.clip(target, 0, 1) - img
    weak = np.abs(d).max(-1) < MIN_CHANGE
    if weak.any():
        sign = np.where(img.mean(-1) > 0.5, F32(-1), F32(1))
        d[weak] = (sign[weak] * F32(MIN_CHANGE))[:, None]
    out[win] = img + a[..., None] * d
    cov[win] = a
    return out, cov
