"""Exact image- and pixel-level anomaly-detection metrics.

Every metric comes from one descending sort of the scores. Tied scores form a single
threshold step, so each curve has one point per distinct score (plus the origin), and
curve areas are trapezoids between these points (the diagonal through a tie group, as in
scikit-learn's ROC AUC).

- AUROC: trapezoid area under (FPR, TPR).
- AP: sum over thresholds of (R_n - R_{n-1}) * P_n (scikit-learn's definition).
- max F1: max over thresholds of 2 TP / (TP + FP + P)  (= 2 TP / (2 TP + FP + FN)).
- AUPRO: ground-truth regions are labelled once (8-connected). At a threshold, the
  per-region overlap is TP_r / |r| and PRO is its mean over all regions of all images.
  A pixel of region r adds 1 / (R |r|) to PRO when it becomes positive, so the whole PRO
  curve is one weighted cumulative sum over the same global sort. The curve (FPR, PRO) is
  integrated up to FPR = fpr_limit, linearly interpolated at fpr_limit, divided by
  fpr_limit.

A metric that cannot be computed (scores of one class only, no masks, no abnormal
pixels) is None, never 0: callers report it as "n/a".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch
from torch import Tensor

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

ArrayLike = Tensor | np.ndarray


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class Curve:
    """Cumulative counts at each distinct threshold, highest first (origin not included)."""

    tp: np.ndarray  # true positives with score >= threshold
    fp: np.ndarray  # false positives with score >= threshold
    pos: int
    neg: int
    pro: np.ndarray | None = None  # mean per-region overlap, when regions were given


def _curve(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> Curve:
    """One global descending sort; counts at the last index of every tie group."""
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    y = labels[order]
    ends = np.flatnonzero(s[1:] != s[:-1])
    ends = np.append(ends, s.size - 1)
    tp = np.cumsum(y, dtype=np.int64)[ends]
    fp = (ends + 1) - tp
    pro = None
    if weights is not None:
        pro = np.cumsum(weights[order], dtype=np.float64)[ends]
    return Curve(tp=tp, fp=fp, pos=int(tp[-1]), neg=int(fp[-1]), pro=pro)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _auroc(c: Curve) -> float:
    fpr = np.concatenate([[0.0], c.fp / c.neg])
    tpr = np.concatenate([[0.0], c.tp / c.pos])
    return _trapezoid(tpr, fpr)


def _ap(c: Curve) -> float:
    precision = c.tp / (c.tp + c.fp)
    recall = c.tp / c.pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _f1_max(c: Curve) -> float:
    return float(np.max(2.0 * c.tp / (c.tp + c.fp + c.pos)))


def _aupro(c: Curve, fpr_limit: float) -> float:
    fpr = np.concatenate([[0.0], c.fp / c.neg])
    pro = np.concatenate([[0.0], c.pro])
    pro = np.minimum(pro, 1.0)  # float rounding of the cumulative sum at the end of the curve
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:k] <= fpr_limit < fpr[k]
    x, y = fpr[:k], pro[:k]
    if k < fpr.size and x[-1] < fpr_limit:
        t = (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, pro[k - 1] + t * (pro[k] - pro[k - 1]))
    return _trapezoid(y, x) / fpr_limit


def image_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float | None]:
    """Image AUROC, AP and max F1 from (N,) scores and (N,) 0/1 labels (None if one class)."""
    s = _numpy(scores).astype(np.float64).ravel()
    y = _numpy(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    out: dict[str, float | None] = {"image_auroc": None, "image_ap": None, "image_f1_max": None}
    if y.all() or not y.any():
        return out
    c = _curve(s, y)
    out.update(image_auroc=_auroc(c), image_ap=_ap(c), image_f1_max=_f1_max(c))
    return out


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected ground-truth regions of (N, H, W) masks, numbered 1..R over all images."""
    labels = np.zeros(masks.shape, dtype=np.int32)
    total = 0
    for i, m in enumerate(masks):
        lab, n = ndi.label(m, structure=EIGHT_CONNECTED)
        labels[i] = np.where(lab > 0, lab + total, 0)
        total += n
    return labels, total


def _region_weights(masks: np.ndarray) -> np.ndarray | None:
    """Per pixel: 1 / (R |r|) inside region r, 0 outside; None when there is no region."""
    regions, n = label_regions(masks)
    if n == 0:
        return None
    area = np.bincount(regions.ravel(), minlength=n + 1).astype(np.float64)
    w = np.zeros(n + 1, dtype=np.float64)
    w[1:] = 1.0 / (n * area[1:])
    return w[regions.ravel()]


def _pixel_inputs(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    m = _numpy(maps)
    g = _numpy(masks).astype(bool)
    if m.shape != g.shape or m.ndim != 3:
        raise ValueError(f"maps {m.shape} and masks {g.shape} must both be (N, H, W)")
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float64)
    return m, g


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float | None:
    """Exact area under the per-region-overlap curve up to FPR fpr_limit, divided by it.

    maps: (N, H, W) scores; masks: (N, H, W) 0/1. None when there is no abnormal region or
    no normal pixel.
    """
    m, g = _pixel_inputs(maps, masks)
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    w = _region_weights(g)
    if w is None or g.all():
        return None
    return _aupro(_curve(m.ravel(), g.ravel(), w), fpr_limit)


def pixel_metrics(
    maps: ArrayLike, masks: ArrayLike | None, fpr_limit: float = 0.3
) -> dict[str, float | None]:
    """Pixel AUROC, AP, max F1 and AUPRO from one sort of all pixels.

    maps: (N, H, W) scores; masks: (N, H, W) 0/1, or None for image-level-only data (all
    metrics None then, as when there is no abnormal or no normal pixel).
    """
    out: dict[str, float | None] = {"pixel_auroc": None, "pixel_ap": None, "pixel_f1_max": None, "aupro": None}
    if masks is None:
        return out
    m, g = _pixel_inputs(maps, masks)
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    w = _region_weights(g)
    if w is None or g.all():
        return out
    c = _curve(m.ravel(), g.ravel(), w)
    out.update(pixel_auroc=_auroc(c), pixel_ap=_ap(c), pixel_f1_max=_f1_max(c), aupro=_aupro(c, fpr_limit))
    return out
