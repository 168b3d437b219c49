"""Metrics and map post-processing against direct float64 implementations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluate.maps import gaussian_blur, image_scores, to_image_maps
from pipeline.evaluate.metrics import aupro, image_metrics, label_regions, pixel_metrics

# ---------------------------------------------------------------- direct references


def brute_auroc(s: np.ndarray, y: np.ndarray) -> float:
    """Probability that an abnormal score beats a normal one, ties counting one half."""
    pos, neg = s[y].astype(np.float64), s[~y].astype(np.float64)
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def brute_ap_f1(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """AP = sum (R_n - R_{n-1}) P_n over every distinct threshold; max F1 over the same."""
    ap, prev_recall, best_f1 = 0.0, 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = float((pred & y).sum())
        precision, recall = tp / float(pred.sum()), tp / float(y.sum())
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        if precision + recall > 0:
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
    return ap, best_f1


def brute_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Every distinct score as a threshold; regions labelled per threshold; per-region overlap;
    the piecewise-linear PRO curve integrated segment by segment, clipped at fpr_limit."""
    maps = maps.astype(np.float64)
    masks = masks.astype(bool)
    neg = float((~masks).sum())
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        overlaps = []
        for p, m in zip(pred, masks):
            lab, n = ndi.label(m, structure=np.ones((3, 3)))
            for r in range(1, n + 1):
                region = lab == r
                overlaps.append(float((p & region).sum()) / float(region.sum()))
        points.append((float((pred & ~masks).sum()) / neg, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / fpr_limit


def random_case(rng: np.random.Generator, n: int, h: int, w: int, levels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Blobby masks (several regions, some images normal) and scores that favour them."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # a normal image
        noise = ndi.gaussian_filter(rng.standard_normal((h, w)), 1.2)
        masks[i] = noise > np.quantile(noise, 0.8)
    maps = rng.random((n, h, w)) + 0.6 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels  # many ties
    return maps.astype(np.float32), masks


# ---------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("levels", [None, 7, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_equals_brute_force(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    maps, masks = random_case(rng, 4, 9, 11, levels)
    assert label_regions(masks)[1] >= 3
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(brute_aupro(maps, masks, limit), abs=1e-6)


def test_aupro_one_region_by_hand() -> None:
    # region = the pixels scored 5 and 4; four normal pixels. Curve: (0,0) (.25,0) (.25,.5)
    # (.25,1) (.5,1) ...: area up to .3 is .05 * 1, divided by .3.
    maps = np.array([[[6, 5, 4, 3, 2, 1]]], dtype=np.float32)
    masks = np.array([[[0, 1, 1, 0, 0, 0]]], dtype=bool)
    assert aupro(maps, masks) == pytest.approx(1 / 6, abs=1e-12)


def test_aupro_nested_scores_by_hand() -> None:
    # a 3-pixel region whose centre (9) outscores its rim (7, 7); a normal pixel at 8 between.
    # Curve: (0,0) (0,1/3) (1/7,1/3) (1/7,1) (2/7,1) (3/7,1): area to .3 = 1/21 + (.3 - 1/7).
    maps = np.array([[[8, 7, 9, 7, 6, 5, 4, 3, 2, 1]]], dtype=np.float32)
    masks = np.array([[[0, 1, 1, 1, 0, 0, 0, 0, 0, 0]]], dtype=bool)
    assert aupro(maps, masks) == pytest.approx(43 / 63, abs=1e-12)


def test_aupro_averages_over_regions_not_pixels() -> None:
    # image A: a 1-pixel region found first; image B: a 3-pixel region found last.
    # PRO is 1/2 (not 1/4) from FPR 0 to FPR 1, so the normalised area is 1/2.
    maps = np.array([[[10, 1, 1, 1]], [[2, 0.5, 0.5, 0.5]]], dtype=np.float32)
    masks = np.array([[[1, 0, 0, 0]], [[0, 1, 1, 1]]], dtype=bool)
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


def test_aupro_ties_are_one_step() -> None:
    # all scores equal: one threshold, the curve is the straight line (0,0)-(1,1)
    rng = np.random.default_rng(3)
    masks = rng.random((2, 6, 6)) < 0.3
    maps = np.full(masks.shape, 0.5, dtype=np.float32)
    assert aupro(maps, masks) == pytest.approx(0.3 * 0.3 / 2 / 0.3, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_regions_are_eight_connected() -> None:
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 3, 3] = True
    assert label_regions(masks)[1] == 2


def test_aupro_not_available() -> None:
    maps = np.random.default_rng(0).random((2, 5, 5)).astype(np.float32)
    assert aupro(maps, np.zeros((2, 5, 5), dtype=bool)) is None
    assert aupro(maps, np.ones((2, 5, 5), dtype=bool)) is None
    with pytest.raises(ValueError, match="must both be"):
        aupro(maps, np.zeros((2, 5, 4), dtype=bool))


# ---------------------------------------------------------------- image and pixel metrics


def test_image_metrics_by_hand() -> None:
    m = image_metrics(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert m["image_auroc"] == pytest.approx(0.75)
    assert m["image_ap"] == pytest.approx((0.5 * 1.0) + (0.5 * 2 / 3))
    assert m["image_f1_max"] == pytest.approx(0.8)  # at 0.35: precision 2/3, recall 1


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_equal_direct(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(60) < 0.4
    s = rng.random(60) + 0.3 * y
    if seed % 2:
        s = np.round(s * 5) / 5  # ties
    m = image_metrics(s, y.astype(int))
    ap, f1 = brute_ap_f1(s, y)
    assert m["image_auroc"] == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["image_ap"] == pytest.approx(ap, abs=1e-12)
    assert m["image_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["image_f1_max"] == pytest.approx(f1, abs=1e-12)


def test_image_metrics_one_class_is_none() -> None:
    for labels in ([0, 0, 0], [1, 1, 1]):
        assert image_metrics([0.1, 0.5, 0.2], labels) == {"image_auroc": None, "image_ap": None, "image_f1_max": None}


@pytest.mark.parametrize("levels", [None, 4])
def test_pixel_metrics_equal_direct(levels: int | None) -> None:
    rng = np.random.default_rng(11)
    maps, masks = random_case(rng, 3, 8, 8, levels)
    m = pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks))
    s, y = maps.ravel().astype(np.float64), masks.ravel()
    ap, f1 = brute_ap_f1(s, y)
    assert m["pixel_auroc"] == pytest.approx(brute_auroc(s, y), abs=1e-9)
    assert m["pixel_ap"] == pytest.approx(ap, abs=1e-9)
    assert m["pixel_f1_max"] == pytest.approx(f1, abs=1e-9)
    assert m["aupro"] == pytest.approx(brute_aupro(maps, masks), abs=1e-6)


def test_pixel_metrics_without_masks_are_none() -> None:
    maps = np.random.default_rng(0).random((2, 5, 5))
    empty = {"pixel_auroc": None, "pixel_ap": None, "pixel_f1_max": None, "aupro": None}
    assert pixel_metrics(maps, None) == empty
    assert pixel_metrics(maps, np.zeros((2, 5, 5))) == empty


# ---------------------------------------------------------------- maps


def test_blur_equals_scipy() -> None:
    x = torch.rand(2, 23, 40, dtype=torch.float64)
    for sigma in (4.0, 1.3):
        ref = np.stack([ndi.gaussian_filter(a, sigma, mode="reflect", truncate=4.0) for a in x.numpy()])
        np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), ref, atol=1e-12)


def test_upsampling_is_bilinear_on_pixel_centres() -> None:
    p = torch.rand(2, 4, 5, dtype=torch.float64)
    size = 12
    out = to_image_maps(p, size, sigma=0.0).double()
    h, w = p.shape[1:]
    ref = np.zeros((2, size, size))
    for i in range(size):
        for j in range(size):
            y = min(max((i + 0.5) * h / size - 0.5, 0.0), h - 1)
            x = min(max((j + 0.5) * w / size - 0.5, 0.0), w - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            a, b = y - y0, x - x0
            q = p.numpy()
            ref[:, i, j] = (
                (1 - a) * (1 - b) * q[:, y0, x0] + (1 - a) * b * q[:, y0, x1] + a * (1 - b) * q[:, y1, x0] + a * b * q[:, y1, x1]
            )
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    maps = to_image_maps(p, 32)
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
    assert torch.equal(image_scores(maps), maps.amax(dim=(1, 2)))
