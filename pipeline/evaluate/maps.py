"""Anomaly maps shared by every evaluation method.

Patch-level maps on the feature grid become image-level maps the same way for all methods:
bilinear upsampling to the image size, then a Gaussian blur (sigma 4, as PatchCore and
PaDiM do), and the image score is the maximum of the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TRUNCATE = 4.0  # kernel radius = round(TRUNCATE * sigma), as scipy.ndimage.gaussian_filter


def check_features(feats: list[Tensor], name: str = "features") -> tuple[int, int, int]:
    """Check a list over levels of (B, C_l, h, w) tensors on one grid; return (B, h, w)."""
    if not isinstance(feats, (list, tuple)) or len(feats) == 0:
        raise ValueError(f"{name}: expected a non-empty list over levels of (B, C, h, w) tensors")
    shapes = [tuple(f.shape) for f in feats]
    if any(len(s) != 4 for s in shapes):
        raise ValueError(f"{name}: every level must be (B, C, h, w), got shapes {shapes}")
    b, _, h, w = shapes[0]
    if any((s[0], s[2], s[3]) != (b, h, w) for s in shapes):
        raise ValueError(f"{name}: levels must share batch size and grid, got shapes {shapes}")
    return b, h, w


def check_like_fit(feats: list[Tensor], widths: list[int], grid: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """:func:`check_features`, and the level widths (and, when given, the grid) a method was
    fitted on; return (B, h, w)."""
    b, h, w = check_features(feats)
    got = [f.shape[1] for f in feats]
    if got != widths or (grid is not None and (h, w) != tuple(grid)):
        on = (lambda g: f" on a {g[0]}x{g[1]} grid") if grid is not None else (lambda g: "")
        raise ValueError(f"features have widths {got}{on((h, w))}, {widths}{on(grid)} at fit time")
    return b, h, w


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 1-D Gaussian kernel of radius round(4 * sigma)."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _reflect_index(n: int, radius: int, device: torch.device) -> Tensor:
    """Indices of a length-n axis padded by `radius` with half-sample symmetric reflection
    (scipy's mode 'reflect': d c b a | a b c d | d c b a), valid for any radius."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, H, W) maps, borders reflected like scipy.ndimage."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.dtype).to(maps.device)
    r = (k.numel() - 1) // 2
    _, h, w = maps.shape
    x = maps[:, _reflect_index(h, r, maps.device)][:, :, _reflect_index(w, r, maps.device)]
    x = x.unsqueeze(1)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return x.squeeze(1)


def to_image_maps(patch_maps: Tensor, size: int, sigma: float = 4.0) -> Tensor:
    """(B, h, w) patch scores -> (B, size, size) float32 maps: bilinear upsampling
    (pixel centres, align_corners=False), then a Gaussian blur of the given sigma."""
    if patch_maps.ndim != 3:
        raise ValueError(f"patch_maps must be (B, h, w), got shape {tuple(patch_maps.shape)}")
    x = patch_maps.float().unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
    return gaussian_blur(x, sigma)


def image_scores(maps: Tensor) -> Tensor:
    """Image score = maximum of each (H, W) map: (B, H, W) -> (B,)."""
    return maps.flatten(1).amax(dim=1)

