"""AUPRO benchmark: the exact AUPRO of pipeline.evaluate.metrics against the released
200-threshold loop (connected components and per-region overlaps recomputed for every
threshold) and, where it is installed, anomalib's AUPRO, on the same maps; then the pixel
metrics against scikit-learn.

    python bench/aupro.py [--maps 100] [--size 256] [--thresholds 200]
                          [--anomalib-python /tmp/anomalib-venv/bin/python]

anomalib is run in its own interpreter (a separate virtual environment), so it never
enters this project's environment: `python -m venv /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from skimage import measure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pipeline.evaluate.metrics import aupro, pixel_metrics

FPR_LIMIT = 0.3


def make_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks like industrial defects (ellipses and irregular blobs of very different sizes,
    a third of the images normal) and smooth anomaly maps that respond to them imperfectly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    maps = np.zeros((n, size, size), dtype=np.float32)
    for i in range(n):
        strength = np.zeros((size, size))
        if i % 3:
            for _ in range(rng.integers(1, 4)):
                if rng.random() < 0.5:
                    cy, cx = rng.integers(10, size - 10, 2)
                    a, b = rng.uniform(2, size / 6, 2)
                    t = rng.uniform(0, np.pi)
                    u, v = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t), -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
                    region = (u / a) ** 2 + (v / b) ** 2 < 1
                else:
                    noise = ndi.gaussian_filter(rng.standard_normal((size, size)), rng.uniform(3, 10))
                    region = noise > np.quantile(noise, rng.uniform(0.97, 0.995))
                    lab, k = ndi.label(region)
                    region = lab == rng.integers(1, k + 1)
                masks[i] |= region
                strength += region * rng.uniform(0.2, 2.0)
        background = ndi.gaussian_filter(rng.standard_normal((size, size)), 4) * 4
        maps[i] = background + ndi.gaussian_filter(strength, 4) * 3 + 0.05 * rng.standard_normal((size, size))
    return maps, masks


def released_curve(maps: np.ndarray, masks: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The released evaluation loop, as published: `steps` evenly spaced thresholds; for
    each, binarise, label every mask's regions and measure each region's overlap."""
    masks = masks.astype(np.uint8)  # 0/1 masks as the released code receives them
    binary_amaps = np.zeros_like(maps, dtype=bool)
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / steps
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[maps <= th], binary_amaps[maps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fprs.append(fp_pixels / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    return np.array(fprs), np.array(pros)


def released_value(fprs: np.ndarray, pros: np.ndarray) -> float:
    """The released normalisation: keep points with FPR < 0.3, min-max rescale the FPRs."""
    keep = fprs < FPR_LIMIT
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    order = np.argsort(f)
    return float(np.sum(np.diff(f[order]) * (pros[keep][order][1:] + pros[keep][order][:-1]) / 2))


def sampled_value(fprs: np.ndarray, pros: np.ndarray) -> tuple[float, float]:
    """The sampled curve integrated like the exact one (origin added, trapezoids to 0.3,
    interpolated there, / 0.3), and a bound on its sampling error: between two sampled
    thresholds the true curve is monotone inside the box they span, so the trapezoid is
    off by at most half of each box."""
    order = np.lexsort((pros, fprs))
    f = np.concatenate([[0.0], fprs[order]])
    p = np.concatenate([[0.0], pros[order]])
    area = bound = 0.0
    for x0, y0, x1, y1 in zip(f[:-1], p[:-1], f[1:], p[1:]):
        if x0 >= FPR_LIMIT:
            break
        if x1 > FPR_LIMIT:
            y1 = y0 + (y1 - y0) * (FPR_LIMIT - x0) / (x1 - x0)
            x1 = FPR_LIMIT
        area += (x1 - x0) * (y0 + y1) / 2
        bound += (x1 - x0) * abs(y1 - y0) / 2
    return area / FPR_LIMIT, bound / FPR_LIMIT


ANOMALIB_SCRIPT = """
import json, sys, time, numpy as np, torch
from anomalib.metrics.aupro import _AUPRO
maps = torch.from_numpy(np.load(sys.argv[1])); masks = torch.from_numpy(np.load(sys.argv[2]))
best = None
for _ in range(3):
    t = time.process_time(); m = _AUPRO(fpr_limit=0.3); m.update(maps, masks.int())
    value = float(m.compute()); dt = time.process_time() - t
    best = dt if best is None else min(best, dt)
import anomalib
print(json.dumps({"value": value, "seconds": best, "version": anomalib.__version__}))
"""


def run_anomalib(python: str, maps: np.ndarray, masks: np.ndarray) -> dict | str:
    """anomalib's AUPRO in its own interpreter; a reason string when it cannot run."""
    if not Path(python).exists():
        return f"not installed ({python} does not exist)"
    with tempfile.TemporaryDirectory() as d:
        np.save(f"{d}/maps.npy", maps)
        np.save(f"{d}/masks.npy", masks)
        r = subprocess.run([python, "-c", ANOMALIB_SCRIPT, f"{d}/maps.npy", f"{d}/masks.npy"], capture_output=True, text=True)
    if r.returncode != 0:
        return "not installed (" + (r.stderr.strip().splitlines() or ["failed"])[-1] + ")"
    return json.loads(r.stdout.strip().splitlines()[-1])


def best_of(f, repeats: int = 3) -> tuple[float, object]:
    """Least CPU time of the process over `repeats` calls (all threads), and the value."""
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.process_time()
        value = f()
        best = min(best, time.process_time() - t)
    return best, value


def sklearn_pixel(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    s, y = maps.ravel(), masks.ravel()
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    return {"pixel_auroc": roc_auc_score(y, s), "pixel_ap": average_precision_score(y, s), "pixel_f1_max": float(f1.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maps", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--thresholds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anomalib-python", default="/tmp/anomalib-venv/bin/python")
    args = ap.parse_args()

    maps, masks = make_data(args.maps, args.size, args.seed)
    n_regions = sum(measure.label(m).max() for m in masks)
    print(
        f"{args.maps} maps of {args.size}x{args.size}, {int(n_regions)} defect regions, "
        f"{masks.mean() * 100:.2f}% abnormal pixels, FPR limit {FPR_LIMIT}; times are CPU seconds of "
        "the process (best of 3, the loop and scikit-learn once), which a busy machine disturbs less than wall time"
    )

    t_ours, ours = best_of(lambda: aupro(maps, masks, FPR_LIMIT))
    t_loop, (fprs, pros) = best_of(lambda: released_curve(maps, masks, args.thresholds), repeats=1)
    sampled, bound = sampled_value(fprs, pros)
    released = released_value(fprs, pros)
    other = run_anomalib(args.anomalib_python, maps, masks)

    print()
    print("| AUPRO implementation | CPU s | AUPRO@0.3 | ours is faster by | difference to ours |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| ours (exact) | {t_ours:.3f} | {ours:.6f} | 1x | 0 |")
    print(
        f"| {args.thresholds}-threshold loop, integrated like ours | {t_loop:.1f} | {sampled:.6f} | "
        f"{t_loop / t_ours:.0f}x | {abs(sampled - ours):.2e} (sampling-error bound {bound:.2e}) |"
    )
    print(
        f"| {args.thresholds}-threshold loop, released normalisation (min-max of FPR < 0.3) | (same run) | "
        f"{released:.6f} | {t_loop / t_ours:.0f}x | {abs(released - ours):.2e} |"
    )
    if isinstance(other, dict):
        print(
            f"| anomalib {other['version']} AUPRO | {other['seconds']:.3f} | {other['value']:.6f} | "
            f"{other['seconds'] / t_ours:.1f}x | {abs(other['value'] - ours):.2e} |"
        )
    else:
        print(f"| anomalib: {other} | - | - | - | - |")

    t_pix, pix = best_of(lambda: pixel_metrics(maps, masks, FPR_LIMIT))
    t_sk, sk = best_of(lambda: sklearn_pixel(maps, masks), repeats=1)
    print()
    print("| pixel AUROC + AP + max F1 | CPU s | AUROC | AP | max F1 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| ours (pixel_metrics, AUPRO included) | {t_pix:.3f} | {pix['pixel_auroc']:.6f} | {pix['pixel_ap']:.6f} | "
        f"{pix['pixel_f1_max']:.6f} |"
    )
    print(
        f"| scikit-learn (roc_auc_score, average_precision_score, precision_recall_curve) | {t_sk:.3f} | "
        f"{sk['pixel_auroc']:.6f} | {sk['pixel_ap']:.6f} | {sk['pixel_f1_max']:.6f} |"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
