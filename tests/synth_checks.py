"""Checks of the synthetic data's images and masks, shared by the synth tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


CAMERA_COVERED = 0.9
"""With camera effects, the share of mask pixels that must change in the written 8-bit image
(edge pixels whose change the blur and the warp weakened below half a grey level keep their value)."""


def read(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    assert img is not None, f"unreadable image {path}"
    return img


def check_mask(mask_path: Path, image_path: Path) -> np.ndarray:
    """A mask is a single-channel 0/255 image of the image's size with at least one defect pixel."""
    mask = read(mask_path)
    image = read(image_path, cv2.IMREAD_COLOR)
    assert mask.ndim == 2 and mask.dtype == np.uint8, mask_path
    assert mask.shape == image.shape[:2], (mask_path, mask.shape, image.shape)
    assert set(np.unique(mask)) <= {0, 255}, mask_path
    assert mask.any(), f"empty mask {mask_path}"
    return mask


def assert_exact(clean: np.ndarray, image: np.ndarray, mask: np.ndarray, ring: int = 1, covered: float = 0.99) -> None:
    """The mask covers the pixels the defect changed: every changed pixel lies within ``ring``
    pixels of the mask (its anti-aliasing border), and (almost) every mask pixel changed."""
    changed = (clean != image).any(-1)
    m = mask > 0
    near = cv2.dilate(m.astype(np.uint8), np.ones((2 * ring + 1, 2 * ring + 1), np.uint8)).astype(bool)
    assert not (changed & ~near).any(), f"{int((changed & ~near).sum())} changed pixels outside the mask"
    assert (changed & m).sum() >= covered * m.sum(), f"only {(changed & m).sum()} of {m.sum()} mask pixels changed"
