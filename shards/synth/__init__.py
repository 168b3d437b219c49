"""Synthetic multi-source industrial anomaly data, written in the public datasets' on-disk layouts.

``generate(layout, out, ...)`` renders product classes (textures and objects, periodic
products and stochastic surfaces, colour and grey-level, every image a new instance), renders
defects into some of them with exact masks, shoots every image through a camera (noise,
vignetting, defocus, perspective), and writes everything as MVTec AD, MPDD, VisA, BTAD,
MVTec 3D-AD or Real-IAD store it, so that a reader written for the real dataset reads the
output unchanged. Classes and defect types come in disjoint families (:data:`FAMILIES`:
pretrain, val, eval). ``--base-images DIR`` uses a folder of the user's own normal images,
whole or cut into tiles, instead of the rendered classes. docs/synth.md describes the
families, the layouts and every detail of them that had to be chosen.

The same arguments and seed give byte-identical files: every image draws its random
numbers from a generator seeded by (seed, class name, role, index), independent of which
other classes are generated and in which order.

Modules: :mod:`~shards.synth.draw` (shared drawing helpers), the product classes in
:mod:`~shards.synth.textures`, :mod:`~shards.synth.objects`, :mod:`~shards.synth.periodic`
and :mod:`~shards.synth.surfaces` (listed in :mod:`~shards.synth.products`), the defects
(:mod:`~shards.synth.shapes`, renderers in :mod:`~shards.synth.marks` and
:mod:`~shards.synth.flaws`, the plan in :mod:`~shards.synth.defects`),
:mod:`~shards.synth.families`, :mod:`~shards.synth.camera`, :mod:`~shards.synth.views`
(Real-IAD's cameras), :mod:`~shards.synth.base` (the user's images),
:mod:`~shards.synth.samples` (the images of one class), :mod:`~shards.synth.output` (files,
encoding, summary), :mod:`~shards.synth.layouts` (one writer per public layout) and
:mod:`~shards.synth.generator` (the entry points).
"""

from shards.synth.families import FAMILIES, FAMILY_NAMES, FAMILY_OF_CLASS, FAMILY_OF_DEFECT
from shards.synth.generator import (
    INFO_FILE,
    add_arguments,
    generate,
    generate_from_args,
    generate_missing,
    generate_source,
    needs_generating,
)
from shards.synth.layouts import SYNTH_LAYOUTS
from shards.synth.output import SynthSummary
from shards.synth.products import CLASS_NAMES, GREY_CLASSES, OBJECT_CLASSES, TEXTURE_CLASSES

__all__ = [
    "CLASS_NAMES",
    "FAMILIES",
    "FAMILY_NAMES",
    "FAMILY_OF_CLASS",
    "FAMILY_OF_DEFECT",
    "GREY_CLASSES",
    "INFO_FILE",
    "OBJECT_CLASSES",
    "SYNTH_LAYOUTS",
    "TEXTURE_CLASSES",
    "SynthSummary",
    "add_arguments",
    "generate",
    "generate_from_args",
    "generate_missing",
    "generate_source",
    "needs_generating",
]
