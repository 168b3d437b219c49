"""The product classes of the synthetic data (textures and objects, alternating) and the
normal image of one: rendered, or made from a user's own image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from shards.synth.draw import F32, Rng, Scene
from shards.synth.objects import OBJECTS
from shards.synth.textures import TEXTURES


@dataclass(frozen=True)
class ClassSpec:
    kind: str  # "texture" or "object"
    render: Callable[[Rng, int, int, int], Scene]


CLASSES: dict[str, ClassSpec] = {}
for _t, _o in zip(TEXTURES.items(), OBJECTS.items()):
    CLASSES[_t[0]] = ClassSpec("texture", _t[1])
    CLASSES[_o[0]] = ClassSpec("object", _o[1])
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
"""All synthetic classes, alternating textures and objects."""
TEXTURE_CLASSES = tuple(n for n, c in CLASSES.items() if c.kind == "texture")
OBJECT_CLASSES = tuple(n for n, c in CLASSES.items() if c.kind == "object")


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
