"""Real-camera effects, drawn per image: a slight perspective, mild defocus blur, vignetting
and exposure, a black level, and sensor noise (shot noise growing with the signal, plus read
noise); one noise channel for grey-level products (a monochrome sensor), three otherwise.

The defect is rendered into the clean scene first; then the same perspective and blur are
applied to the clean image, to the defective image and to the defect's coverage, and the mask
is the shot coverage ``>= MASK_LEVEL``. The noise field is drawn once per image, so the clean
twin and the defective image carry the same noise wherever the defect did not reach. A blur
of kernel radius r widens the ring of changed pixels around the mask: every changed pixel
lies within ``ring = 1 + r`` pixels of the mask (``Shot.ring``), and pixels farther out keep
the clean image (only the faint tail of the blur kernel is left out there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from shards.synth.defects import MASK_LEVEL
from shards.synth.draw import F32, Rng, coarse, to_uint8, upsample


HEADROOM = 0.015
"""The brightest scene value maps this far below full scale, so noise rarely clips."""
INSET = 0.02
"""The perspective moves each image corner inward by up to this fraction of the side."""


@dataclass
class Camera:
    """One image's camera: the effects and their parameters."""

    hom: np.ndarray | None  # output -> scene homography; None: no perspective
    sigma: float  # defocus blur, pixels (0: sharp)
    radius: int  # blur kernel radius, pixels
    gain: np.ndarray  # (H, W, 1) vignetting times exposure
    black: float
    read: float  # read-noise deviation
    shot: float  # shot-noise deviation at full scale
    z: np.ndarray  # (H, W, 1 or 3) standard normal noise field

    @property
    def ring(self) -> int:
        return 1 + self.radius

    def geometry(self, img: np.ndarray) -> np.ndarray:
        """Perspective and blur, the same for an image and for a coverage field."""
        h, w = self.gain.shape[:2]
        out = img
        if self.hom is not None:
            out = cv2.warpPerspective(out, self.hom, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                      borderMode=cv2.BORDER_REFLECT101)
        if self.radius:
            k = 2 * self.radius + 1
            out = cv2.GaussianBlur(out, (k, k), self.sigma, borderType=cv2.BORDER_REFLECT101)
        return out

    def shoot(self, img: np.ndarray) -> np.ndarray:
        """The picture the camera takes of a scene image (float RGB in [0, 1])."""
        x = self.geometry(img) * self.gain
        y = F32(self.black) + F32(1 - self.black - HEADROOM) * x
        y += self.z * np.sqrt(F32(self.read**2) + F32(self.shot**2) * np.clip(y, 0, 1))
        return np.clip(y, 0, 1)


def _homography(rng: Rng, h: int, w: int) -> np.ndarray:
    out = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    inward = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], np.float32)
    scene = out + inward * rng.uniform(0, INSET, (4, 2)).astype(np.float32) * np.float32([w, h])
    return cv2.getPerspectiveTransform(out, scene)


def _vignette(rng: Rng, h: int, w: int) -> np.ndarray:
    x, y, _, _ = coarse(h, w)
    cx, cy = w * (0.5 + rng.uniform(-0.1, 0.1)), h * (0.5 + rng.uniform(-0.1, 0.1))
    r2 = ((x - F32(cx)) ** 2 + (y - F32(cy)) ** 2) / F32((h * h + w * w) / 4)
    return upsample((1 - F32(rng.uniform(0.05, 0.3)) * r2).astype(F32), h, w)


def draw_camera(rng: Rng, h: int, w: int, grey: bool, perspective: bool = True) -> Camera:
    """A camera for one (h, w) image: its effects drawn from ``rng``."""
    sc = min(h, w) / 256
    hom = _homography(rng, h, w) if perspective else None
    sigma = rng.uniform(0.35, 0.75) * sc if rng.random() < 0.7 else 0.0
    radius = max(1, math.ceil(2 * sigma)) if sigma > 0 else 0
    gain = (_vignette(rng, h, w) * F32(rng.uniform(0.88, 1.0)))[..., None]
    black = rng.uniform(2, 6) / 255
    read, shot = rng.uniform(0.5, 2.0) / 255, rng.uniform(0.8, 2.5) / 255
    z = rng.standard_normal((h, w, 1 if grey else 3), dtype=F32)
    return Camera(hom, sigma, radius, gain, black, read, shot, z)


@dataclass
class Shot:
    """A picture as written: the image, its clean twin, the mask (None: normal) and its ring."""

    image: np.ndarray  # (H, W, 3) uint8
    clean: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) uint8 0/255
    ring: int  # every changed pixel lies within this many pixels of the mask


def develop(cam: Camera | None, clean: np.ndarray, image: np.ndarray | None = None,
            cov: np.ndarray | None = None) -> Shot:
    """Shoot a clean scene image and (optionally) the same scene with a defect and its
    coverage; without a camera the images are written as they are. The defective picture is
    the clean one beyond ``ring`` pixels of the mask."""
    clean_f = clean if cam is None else cam.shoot(clean)
    clean_u8 = to_uint8(clean_f)
    if cov is None:
        return Shot(clean_u8, clean_u8, None, 0)
    mask = (cov if cam is None else cam.geometry(cov)) >= MASK_LEVEL
    ring = 1 if cam is None else cam.ring
    if not mask.any():
        return Shot(clean_u8, clean_u8, None, 0)
    shot_f = image if cam is None else cam.shoot(image)
    near = cv2.dilate(mask.astype(np.uint8), np.ones((2 * ring + 1, 2 * ring + 1), np.uint8)).astype(bool)
    out = np.where(near[..., None], to_uint8(shot_f), clean_u8)
    return Shot(out, clean_u8, np.where(mask, 255, 0).astype(np.uint8), ring)
