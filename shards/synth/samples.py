"""The images of one synthetic class: normal scenes (rendered, or the user's images), its
planned defects, and the single image or the camera views of one sample.

Every image draws its random numbers from a generator seeded by (seed, class name, role,
index), independent of which other classes are generated and in which order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shards.errors import UserError
from shards.synth.defects import MASK_LEVEL, DefectSpec, apply_defect, plan_defects
from shards.synth.draw import Scene, to_uint8
from shards.synth.products import render_class, scene_from_image
from shards.synth.views import view_homography, view_light, warp_view


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
REALIAD_CANVAS = 1.35
"""A Real-IAD sample is rendered on a canvas this much larger than a view, then shot from each view."""


@dataclass
class Item:
    """One written image: the defective (or normal) picture, its mask, and its defect type."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None  # (H, W) uint8 0/255, None for a normal image
    defect: str | None
    clean: np.ndarray  # the same instance without the defect (the image itself when normal)


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


class ClassSource:
    """Normal scenes of one class (rendered, or the user's images) and its planned defects."""

    def __init__(self, name: str, seed: int, abnormal: int, base_files: list[Path] | None, normal: int) -> None:
        self.name = name
        self.seed = seed
        self.base_files = base_files
        self.plan = plan_defects(self._rng(2, 0), abnormal)
        if base_files is not None:
            self.normal_files = base_files[:normal]
            self.abnormal_files = base_files[normal:] or base_files

    def _rng(self, role: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, seed_of(self.name), role, index])

    def _scene(self, role: int, index: int, size: int, rng: np.random.Generator, canvas: int | None = None) -> Scene:
        if self.base_files is None:
            return render_class(self.name, rng, size, canvas)
        files = self.normal_files if role == 0 else self.abnormal_files
        return scene_from_image(read_rgb(files[index % len(files)]), canvas or size)

    def _defect(self, scene: Scene, spec: DefectSpec, rng: np.random.Generator, size: int, region: float):
        for _ in range(8):
            img, cov = apply_defect(scene, spec, rng, size, region)
            if np.count_nonzero(cov >= MASK_LEVEL) >= 4:
                return img, cov
        raise RuntimeError(f"{self.name}: could not place a visible {spec.kind} defect")

    def single(self, index: int, size: int, spec: DefectSpec | None) -> Item:
        """A normal image (spec None) or an abnormal one, ``index`` counting within its role."""
        role = 0 if spec is None else 1
        rng = self._rng(role, index)
        scene = self._scene(role, index, size, rng)
        clean = to_uint8(scene.image)
        if spec is None:
            return Item(clean, None, None, clean)
        img, cov = self._defect(scene, spec, rng, size, 0.9)
        return Item(to_uint8(img), np.where(cov >= MASK_LEVEL, 255, 0).astype(np.uint8), spec.kind, clean)

    def views(self, index: int, size: int, views: int, spec: DefectSpec | None) -> list[Item]:
        """One physical sample shot from ``views`` cameras: C1 from above, the others tilted
        from four sides, each with its own scale and lighting. A view that does not show the
        defect is a normal image."""
        role = 0 if spec is None else 1
        rng = self._rng(role, index)
        canvas = round(size * REALIAD_CANVAS)
        scene = self._scene(role, index, size, rng, canvas)
        img, cov = (scene.image, None) if spec is None else self._defect(scene, spec, rng, size, 0.5)
        items = []
        for v in range(views):
            hom = view_homography(rng, v, size, canvas)
            gain = view_light(rng, size)
            clean = to_uint8(warp_view(scene.image, hom, size) * gain)
            mask = None if cov is None else warp_view(cov, hom, size) >= MASK_LEVEL
            if mask is not None and mask.any():
                # interpolation spreads faint residues of the ring; keep changes within one pixel of the mask
                ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                shot = np.where(ring[..., None], to_uint8(warp_view(img, hom, size) * gain), clean)
                items.append(Item(shot, np.where(mask, 255, 0).astype(np.uint8), spec.kind, clean))
            else:
                items.append(Item(clean, None, None, clean))
        return items


def read_rgb(path: Path) -> np.ndarray:
    data = np.fromfile(path, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise UserError(f"synth: cannot decode base image {str(path)!r}; remove it or convert it to PNG/JPEG")
    return img[..., ::-1]


def list_base_images(base_images: str | Path) -> list[Path]:
    root = Path(base_images)
    if not root.is_dir():
        raise UserError(f"synth: --base-images {str(root)!r} is not a folder; give a folder of normal jpg/png images")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(
            f"synth: --base-images {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "put the normal images of the product directly in that folder"
        )
    return files
