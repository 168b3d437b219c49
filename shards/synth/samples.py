"""The images of one synthetic class: normal scenes (rendered, or the user's images), its
planned defects, and the single image or the camera views of one sample.

Every image draws its random numbers from a generator seeded by (seed, class name, role,
index), independent of which other classes are generated and in which order; its camera
effects from a second generator seeded the same way, so that they do not depend on how
often a defect had to be placed again.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

from shards.synth.base import Piece, scene_from_piece
from shards.synth.camera import Camera, develop, draw_camera
from shards.synth.defects import MASK_LEVEL, DefectSpec, apply_defect, plan_defects
from shards.synth.draw import Scene
from shards.synth.families import defect_types
from shards.synth.products import render_class
from shards.synth.views import view_homography, view_light, warp_view


REALIAD_CANVAS = 1.35
"""A Real-IAD sample is rendered on a canvas this much larger than a view, then shot from each view."""
MIN_MASK_PX = 4


@dataclass
class Item:
    """One written image: the defective (or normal) picture, its mask, and its defect type."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None  # (H, W) uint8 0/255, None for a normal image
    defect: str | None
    clean: np.ndarray  # the same instance without the defect (the image itself when normal)
    ring: int = 1  # every pixel that differs from ``clean`` lies within this many pixels of the mask


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


class ClassSource:
    """Normal scenes of one class (rendered, or pieces of the user's images) and its planned defects.

    ``family``: the defect types of a class made from the user's images (None: every type);
    a synthetic class always draws its own family's. ``defects``: only those of these types
    (checked by :func:`~shards.synth.families.chosen_defects`). ``camera``: real-camera
    effects on the rendered classes (the user's images are photographs already and get none)."""

    def __init__(self, name: str, seed: int, abnormal: int, base_files: list[Piece] | None, normal: int, *,
                 height: int | None = None, family: str | None = None, defects: tuple[str, ...] | None = None,
                 camera: bool = True) -> None:
        self.name = name
        self.seed = seed
        self.base_files = base_files
        self.height = height
        self.types = defect_types(None if base_files is not None else name, family, defects)
        self.camera = camera and base_files is None
        self.plan = plan_defects(self._rng(2, 0), abnormal, self.types) if abnormal else []
        if base_files is not None:
            self.normal_files = base_files[:normal]
            self.abnormal_files = base_files[normal:] or base_files

    def _rng(self, role: int, index: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, seed_of(self.name), role, index, *extra])

    def _camera(self, role: int, index: int, h: int, w: int, grey: bool, view: int | None = None) -> Camera | None:
        if not self.camera:
            return None
        rng = self._rng(role, index, 7) if view is None else self._rng(role, index, 7, view)
        return draw_camera(rng, h, w, grey, perspective=view is None)

    def _scene(self, role: int, index: int, size: int, rng: np.random.Generator, canvas: tuple[int, int] | None = None) -> Scene:
        h = self.height or size
        if self.base_files is None:
            return render_class(self.name, rng, size, canvas, self.height)
        files = self.normal_files if role == 0 else self.abnormal_files
        ch, cw = canvas or (h, size)
        return scene_from_piece(files[index % len(files)], cw, ch)

    def _defect(self, scene: Scene, spec: DefectSpec, rng: np.random.Generator, ref: tuple[int, int], region: float,
                cam: Camera | None = None):
        """The defect rendered into the scene, placed again until it is visible (also through the
        camera, whose blur is dropped for this image when a thin defect keeps blurring away)."""
        for attempt in range(8):
            if cam is not None and attempt == 4:
                cam = replace(cam, sigma=0.0, radius=0)
            img, cov = apply_defect(scene, spec, rng, ref, region)
            if np.count_nonzero(cov >= MASK_LEVEL) >= MIN_MASK_PX and (
                    cam is None or np.count_nonzero(cam.geometry(cov) >= MASK_LEVEL) >= MIN_MASK_PX):
                return img, cov, cam
        raise RuntimeError(f"{self.name}: could not place a visible {spec.kind} defect")

    def single(self, index: int, size: int, spec: DefectSpec | None) -> Item:
        """A normal image (spec None) or an abnormal one, ``index`` counting within its role."""
        role = 0 if spec is None else 1
        h = self.height or size
        rng = self._rng(role, index)
        scene = self._scene(role, index, size, rng)
        cam = self._camera(role, index, h, size, scene.grey)
        if spec is None:
            shot = develop(cam, scene.image)
            return Item(shot.image, None, None, shot.clean, 0)
        img, cov, cam = self._defect(scene, spec, rng, (h, size), 0.9, cam)
        shot = develop(cam, scene.image, img, cov)
        return Item(shot.image, shot.mask, spec.kind, shot.clean, shot.ring)

    def views(self, index: int, size: int, views: int, spec: DefectSpec | None) -> list[Item]:
        """One physical sample shot from ``views`` cameras: C1 from above, the others tilted
        from four sides, each with its own scale, lighting and camera effects. A view that
        does not show the defect is a normal image."""
        role = 0 if spec is None else 1
        h = self.height or size
        rng = self._rng(role, index)
        canvas = (round(h * REALIAD_CANVAS), round(size * REALIAD_CANVAS))
        scene = self._scene(role, index, size, rng, canvas)
        img, cov, _ = (scene.image, None, None) if spec is None else self._defect(scene, spec, rng, (h, size), 0.5)
        items = []
        for v in range(views):
            hom = view_homography(rng, v, (h, size), scene.image.shape[:2])
            gain = view_light(rng, (h, size))
            cam = self._camera(role, index, h, size, scene.grey, v)
            shot = develop(cam, warp_view(scene.image, hom, (h, size)) * gain,
                           None if cov is None else warp_view(img, hom, (h, size)) * gain,
                           None if cov is None else warp_view(cov, hom, (h, size)))
            if shot.mask is not None:
                items.append(Item(shot.image, shot.mask, spec.kind, shot.clean, shot.ring))
            else:
                items.append(Item(shot.clean, None, None, shot.clean, 0))
        return items
