"""The product classes of the synthetic data and the normal image of one.

The fourteen classic classes come first (textures and objects, alternating), then the periodic
products and stochastic surfaces modelled on inspection imagery. A class is a texture (it
fills the image) or an object (it has an outline), colour or grey-level (three equal
channels); :mod:`~shards.synth.families` puts each class in one family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from shards.synth.draw import Rng, Scene
from shards.synth.objects import OBJECTS
from shards.synth.periodic import PERIODIC
from shards.synth.surfaces import SURFACES
from shards.synth.textures import TEXTURES


@dataclass(frozen=True)
class ClassSpec:
    kind: str  # "texture" or "object"
    render: Callable[[Rng, int, int, int], Scene]
    grey: bool = False
    periodic: bool = False


CLASSES: dict[str, ClassSpec] = {}
for _t, _o in zip(TEXTURES.items(), OBJECTS.items()):
    CLASSES[_t[0]] = ClassSpec("texture", _t[1], periodic=_t[0] in ("synth_fabric", "synth_mesh", "synth_tile", "synth_carpet"))
    CLASSES[_o[0]] = ClassSpec("object", _o[1])
_INSPECTION = {  # name: (kind, grey, periodic), in family order: pretrain, val, eval
    "synth_lattice": ("texture", True, True),
    "synth_sandblast": ("texture", True, False),
    "synth_halftone": ("texture", False, True),
    "synth_weave": ("texture", False, True),
    "synth_perforated": ("texture", True, True),
    "synth_paper": ("texture", True, False),
    "synth_painted": ("texture", False, False),
    "synth_wafer": ("object", False, True),
    "synth_label": ("texture", True, True),
    "synth_cast": ("texture", True, False),
    "synth_nonwoven": ("texture", False, False),
}
for _name, (_kind, _grey, _periodic) in _INSPECTION.items():
    CLASSES[_name] = ClassSpec(_kind, {**PERIODIC, **SURFACES}[_name], _grey, _periodic)
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
"""All synthetic classes: the fourteen classic ones (alternating textures and objects), then the new ones."""
TEXTURE_CLASSES = tuple(n for n, c in CLASSES.items() if c.kind == "texture")
OBJECT_CLASSES = tuple(n for n, c in CLASSES.items() if c.kind == "object")
GREY_CLASSES = tuple(n for n, c in CLASSES.items() if c.grey)
"""The grey-level classes: the three channels of every image are equal."""


def render_class(name: str, rng: Rng, size: int, canvas: int | tuple[int, int] | None = None,
                 height: int | None = None) -> Scene:
    """A normal image of a product class (a new instance for every rng state).

    The image is ``size`` wide and ``height`` (default ``size``) high; features are scaled to
    the shorter side. ``canvas`` (a side, or (height, width)) renders a larger image with the
    product centred, so that it shows more of its surroundings."""
    h = height or size
    if canvas is None:
        ch, cw = h, size
    elif isinstance(canvas, int):
        ch = cw = canvas
    else:
        ch, cw = canvas
    spec = CLASSES[name]
    scene = spec.render(rng, ch, cw, min(size, h))
    np.clip(scene.image, 0, 1, out=scene.image)
    if scene.background is not None:
        scene.background = np.clip(scene.background, 0, 1)
    if scene.plain is not None:
        scene.plain = np.clip(scene.plain, 0, 1)
    scene.grey = spec.grey
    return scene
