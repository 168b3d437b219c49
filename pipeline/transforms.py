"""Image decoding, geometry (resize + center crop), photometric views and patch labels.

Used by training, the reference-bank/centers stages and evaluation, so every stage sees
images the same way (METHOD.md §2: bicubic resize, center crop, the backbone's own
normalisation; §4: photometric augmentation only, so masks keep their positions).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000
# OpenCV runs sequentially in every process that sees images: a loader process forked while
# OpenCV's thread pool runs in its parent (synthesis uses it) hangs on its first parallel call,
# and each process here already works with the threads torch gives it.
cv2.setNumThreads(1)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 RGB array (H, W, 3). Raises on corrupt or truncated data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.array(im)  # a writable copy


def decode_mask(data: bytes) -> np.ndarray:
    """Encoded mask -> bool array (H, W): any non-zero pixel is abnormal."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > 0


def _resize_crop(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): shorter side to ``size``, then a center crop."""
    h, w = t.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        kw = {"antialias": True, "align_corners": False} if mode == "bicubic" else {}
        t = F.interpolate(t[None], size=(nh, nw), mode=mode, **kw)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return t[:, top : top + size, left : left + size]


def image_to_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, size, size) in [0, 1] (bicubic resize, center crop)."""
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    return _resize_crop(t, size, "bicubic").clamp_(0.0, 1.0)


def mask_to_tensor(mask: np.ndarray | None, size: int) -> torch.Tensor:
    """bool (H, W) or None -> bool (size, size) with the image's geometry (nearest)."""
    if mask is None:
        return torch.zeros(size, size, dtype=torch.bool)
    t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
    return _resize_crop(t, size, "nearest")[0] > 0.5


class GaussianBlur:
    """Gaussian blur of a float (3, H, W) image with sigma drawn uniformly from ``sigma`` (torch's RNG).

    The same kernel and reflect border as ``torchvision.transforms.v2.GaussianBlur`` (equal to
    1e-5, tested), computed by OpenCV: at 224 px and a 23-tap kernel, one CPU thread, 0.6 ms
    against 11.4 ms for torchvision's, which made blur half of a loader's work per image.
    """

    def __init__(self, kernel: int, sigma: tuple[float, float]):
        self.kernel, self.sigma = kernel, sigma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.empty(1).uniform_(*self.sigma).item()
        planes = np.ascontiguousarray(x.numpy())
        out = [cv2.GaussianBlur(c, (self.kernel, self.kernel), s, sigmaY=s, borderType=cv2.BORDER_REFLECT_101)
               for c in planes]
        return torch.from_numpy(np.stack(out))


class PhotometricViews:
    """Two independently augmented views of an image (METHOD.md §4): colour jitter
    (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur sigma in [0.1, 2]
    with p=0.5. Geometry is untouched, so the mask applies to both views."""

    def __init__(self, size: int, enabled: bool = True):
        k = max(3, (size // 10) | 1)  # odd kernel about a tenth of the image side
        self.transform = (
            v2.Compose(
                [
                    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                    v2.RandomGrayscale(p=0.2),
                    v2.RandomApply([GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
                ]
            )
            if enabled
            else None
        )

    def __call__(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is None:
            return x01, x01.clone()
        return self.transform(x01), self.transform(x01)


def normalize(x01: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(-1, 1, 1)
    return (x01 - m) / s


def patch_labels(masks: torch.Tensor, grid: int, mode: str, threshold: int = 32) -> torch.Tensor:
    """Pixel masks (B, S, S) -> patch labels (B, grid, grid) bool.

    ``pixels``: a patch is abnormal when more than ``threshold`` pixels of its cell are
    (METHOD.md: > 32 of the 14x14 cell at 224 with a 16x16 grid); the count is scaled to
    the cell area when S / grid is not 14. ``nearest``: the mask resized by nearest neighbour.
    """
    m = masks.float()[:, None]
    if mode == "nearest":
        return F.interpolate(m, size=(grid, grid), mode="nearest")[:, 0] > 0.5
    if mode != "pixels":
        raise ValueError(f"patch label mode {mode!r}: use 'pixels' or 'nearest'")
    frac = F.adaptive_avg_pool2d(m, grid)[:, 0]  # fraction of abnormal pixels per cell
    return frac > threshold / (14.0 * 14.0)
