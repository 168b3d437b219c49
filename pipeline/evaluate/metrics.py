"""Exact image- and pixel-level anomaly-detection metrics.

Every distinct score is a threshold (a pixel or image is positive when its score is >= the
threshold); tied scores form one threshold step, and curve areas are trapezoids between
the curve's points, so a tie group of normal and abnormal samples is a diagonal segment
(as in scikit-learn's ROC AUC).

- AUROC: trapezoid area under (FPR, TPR).
- AP: sum over thresholds of (R_n - R_{n-1}) * P_n (scikit-learn's definition).
- max F1: max over thresholds of 2 TP / (TP + FP + P)  (= 2 TP / (2 TP + FP + FN)).
- AUPRO: ground-truth regions are labelled once (8-connected). At a threshold, the
  per-region overlap of region r is TP_r / |r| and PRO is its mean over all regions of all
  images, so an abnormal pixel of region r adds w = 1 / (R |r|) to PRO when it becomes
  positive: PRO at a threshold is a weighted count of the abnormal pixels above it. The
  curve (FPR, PRO) is integrated up to FPR = fpr_limit, linearly interpolated at
  fpr_limit, and divided by fpr_limit.

How it is computed: the normal scores are sorted once (np.sort: a value sort, much faster
than an argsort of all pixels) and the abnormal ones are argsorted with their weights;
the weight of abnormal scores above every normal-score group comes from locating the
abnormal scores among the groups (binary searches) and summing from the top, and the
normal count above every abnormal score from binary searches. The curves change in FPR only at
normal scores, and the ROC/PRO curve between two consecutive normal-score groups is
vertical (zero area), so each area is a sum over the normal-score groups v, of width
count(v) / N, of the trapezoid between the curve value just above v and at v. AP and
F1 only change at abnormal scores. This is the same curve as one global sort with
cumulative sums per region would give, checked against brute force in the tests. For
AUPRO alone, only the top fpr_limit share of the normal scores is sorted (np.partition).

A metric that cannot be computed (scores of one class only, no masks, no abnormal
pixels, no normal pixels) is None, never 0: callers report it as "n/a".
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage as ndi
import torch
from torch import Tensor

IN_PLANE_EIGHT_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_EIGHT_CONNECTED[1] = True

ArrayLike = Tensor | np.ndarray


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


class _Above:
    """Scores sorted ascending with their weights: the weight above any threshold."""

    def __init__(self, scores: np.ndarray, weights: np.ndarray | None = None) -> None:
        order = np.argsort(scores, kind="stable")
        self.sorted = scores[order]
        self.weights = np.ones(scores.size) if weights is None else weights[order].astype(np.float64)
        self.total = float(self.weights.sum())

    def gt_ge(self, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weight of the scores > t and >= t for every t of a strictly descending array.

        The scores are located among the thresholds (few binary searches when there are
        fewer scores than thresholds) and the weights summed from the top.
        """
        asc = desc[::-1]
        g = asc.size

        def above(side: str) -> np.ndarray:
            # score p lies above asc[j] (strictly for side 'left') iff searchsorted(asc, p) > j
            pos = np.searchsorted(asc, self.sorted, side=side)
            w = np.bincount(pos, weights=self.weights, minlength=g + 1)
            return np.cumsum(w[::-1])[::-1][1:][::-1]  # entry j: sum of w[j+1:], then descending order

        return above("left"), above("right")


def _groups(desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a descending array, and how often each occurs."""
    starts = np.flatnonzero(np.concatenate([[True], desc[1:] != desc[:-1]]))
    return desc[starts], np.diff(np.append(starts, desc.size))


def _area(above: _Above, neg_desc: np.ndarray, n_neg: int, limit: float = 1.0) -> float:
    """Area under (FPR, weight of positives above) up to FPR `limit`, interpolated there.

    neg_desc holds (at least) every normal score of the part of the curve up to `limit`,
    sorted descending; n_neg is the number of all normal scores.
    """
    v, c = _groups(neg_desc)
    end = np.cumsum(c) / n_neg
    k = min(int(np.searchsorted(end, limit, side="left")), v.size - 1)  # group reaching `limit`
    start = end[k - 1] if k > 0 else 0.0
    lo, hi = above.gt_ge(v[: k + 1])
    width = c[: k + 1] / n_neg
    full = float(np.sum(width[:k] * (lo[:k] + hi[:k]))) / 2.0
    alpha = (limit - start) / width[k]  # share of the last group's segment below `limit`
    part = alpha * width[k] * (2.0 * lo[k] + alpha * (hi[k] - lo[k])) / 2.0
    return full + float(part)


def _ap_f1(pos: _Above, neg_asc: np.ndarray) -> tuple[float, float]:
    u, d = _groups(pos.sorted[::-1])
    tp = np.cumsum(d)
    fp = neg_asc.size - np.searchsorted(neg_asc, u, side="left")
    n_pos = pos.sorted.size
    ap = float(np.sum(d / n_pos * tp / (tp + fp)))
    f1 = float(np.max(2.0 * tp / (tp + fp + n_pos)))
    return ap, f1


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")


def image_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float | None]:
    """Image AUROC, AP and max F1 from (N,) scores and (N,) 0/1 labels (None if one class)."""
    s = _numpy(scores).astype(np.float64).ravel()
    y = _numpy(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    _check_finite(s, "image scores")
    out: dict[str, float | None] = {"image_auroc": None, "image_ap": None, "image_f1_max": None}
    if y.all() or not y.any():
        return out
    pos, neg_asc = _Above(s[y]), np.sort(s[~y])
    ap, f1 = _ap_f1(pos, neg_asc)
    auroc = _area(pos, neg_asc[::-1], neg_asc.size) / pos.total
    out.update(image_auroc=auroc, image_ap=ap, image_f1_max=f1)
    return out


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected ground-truth regions of (N, H, W) masks, numbered 1..R over all images
    (one labelling call; the structure connects pixels within an image only)."""
    return ndi.label(masks, structure=IN_PLANE_EIGHT_CONNECTED)


def _pixel_inputs(maps: ArrayLike, masks: ArrayLike, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    m = _numpy(maps)
    g = _numpy(masks).astype(bool)
    if m.shape != g.shape or m.ndim != 3:
        raise ValueError(f"maps {m.shape} and masks {g.shape} must both be (N, H, W)")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float64)
    _check_finite(m, "anomaly maps")
    return m, g


def _region_above(maps: np.ndarray, masks: np.ndarray) -> _Above:
    """Abnormal pixel scores weighted 1 / (R |r|), so that the weight above a threshold is PRO."""
    regions, n = label_regions(masks)
    ids = regions[masks]
    area = np.bincount(ids, minlength=n + 1).astype(np.float64)
    return _Above(maps[masks], 1.0 / (n * area[ids]))


def _top_desc(neg: np.ndarray, limit: float) -> np.ndarray:
    """Every normal score that the curve up to FPR `limit` needs, sorted descending: all
    scores >= the m-th largest, m one past ceil(limit * N), ties included."""
    m = min(neg.size, math.ceil(limit * neg.size) + 1)
    kth = np.partition(neg, neg.size - m)[neg.size - m]
    return np.sort(neg[neg >= kth])[::-1]


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float | None:
    """Exact area under the per-region-overlap curve up to FPR fpr_limit, divided by it.

    maps: (N, H, W) scores; masks: (N, H, W) 0/1. None when there is no abnormal or no
    normal pixel.
    """
    m, g = _pixel_inputs(maps, masks, fpr_limit)
    if g.all() or not g.any():
        return None
    neg = m[~g]
    return _area(_region_above(m, g), _top_desc(neg, fpr_limit), neg.size, fpr_limit) / fpr_limit


def pixel_metrics(maps: ArrayLike, masks: ArrayLike | None, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Pixel AUROC, AP, max F1 and AUPRO, sharing one sort of the normal pixels.

    maps: (N, H, W) scores; masks: (N, H, W) 0/1, or None for image-level-only data (all
    metrics None then, as when there is no abnormal or no normal pixel).
    """
    out: dict[str, float | None] = {"pixel_auroc": None, "pixel_ap": None, "pixel_f1_max": None, "aupro": None}
    if masks is None:
        return out
    m, g = _pixel_inputs(maps, masks, fpr_limit)
    if g.all() or not g.any():
        return out
    neg_asc = np.sort(m[~g])
    neg_desc = neg_asc[::-1]
    pos = _Above(m[g])
    ap, f1 = _ap_f1(pos, neg_asc)
    out.update(
        pixel_auroc=_area(pos, neg_desc, neg_asc.size) / pos.total,
        pixel_ap=ap,
        pixel_f1_max=f1,
        aupro=_area(_region_above(m, g), neg_desc, neg_asc.size, fpr_limit) / fpr_limit,
    )
    return out
