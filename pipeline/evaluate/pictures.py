"""Evaluation pictures (PNG, matplotlib Agg): anomaly-map grids, feature-norm histograms and the
val diagnosis's histograms (:mod:`pipeline.evaluate.diagnosis`)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.levels import level_name  # noqa: E402


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def map_grid(path: str, title: str, images: np.ndarray, masks: np.ndarray | None,
             maps: dict[str, np.ndarray], gap: int = 4) -> str:
    """One row per test image: the image, its ground truth, then one column per map.

    images: (N, 3, S, S) in [0, 1]; masks: (N, S, S) bool or None (no ground truth: a
    grey tile); maps: column title -> (N, S, S) anomaly maps. Each map column is coloured
    on one scale over its rows, so rows can be compared. Drawn as one mosaic (one axes).
    """
    n, _, s, _ = images.shape
    cmap = matplotlib.colormaps["jet"]
    columns = [np.clip(images.transpose(0, 2, 3, 1), 0, 1)]
    gt = np.full((n, s, s), 0.5) if masks is None else masks.astype(np.float64)
    columns.append(np.repeat(gt[..., None], 3, axis=3))
    for m in maps.values():
        lo, hi = float(m.min()), float(m.max())
        columns.append(cmap((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m))[..., :3])
    cols = len(columns)
    mosaic = np.ones((n * s + (n - 1) * gap, cols * s + (cols - 1) * gap, 3))
    for j, col in enumerate(columns):
        for i in range(n):
            mosaic[i * (s + gap) : i * (s + gap) + s, j * (s + gap) : j * (s + gap) + s] = col[i]
    fig = plt.figure(figsize=(1.6 * cols, 1.6 * n + 0.6))
    ax = fig.add_axes((0, 0, 1, 1 - 0.6 / (1.6 * n + 0.6)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    names = ["image", "ground truth" if masks is not None else "ground truth (n/a)", *maps]
    for j, name in enumerate(names):
        ax.text(j * (s + gap) + s / 2, -gap, name, ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=9, y=1.0)
    return _save(fig, path)


def _histograms(ax, groups: dict[str, np.ndarray], title: str, xlabel: str) -> None:
    """Density histograms of the groups' values on shared bins, in one panel."""
    values = [v for v in groups.values() if v.size]
    if values:
        lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
        for label, v in groups.items():
            if v.size:
                ax.hist(v, bins=bins, alpha=0.55, density=True, label=f"{label} ({v.size})")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)


def norm_histograms(path: str, title: str, norms: dict[str, dict[str, np.ndarray]]) -> str:
    """One panel per feature kind: histograms of patch scores sqrt(||e||+1)-1 of normal and
    abnormal patches. norms: kind -> {"normal": (n,), "abnormal": (m,)}."""
    fig, axes = plt.subplots(1, len(norms), figsize=(4.0 * len(norms), 3.0), squeeze=False)
    for ax, (kind, groups) in zip(axes[0], norms.items()):
        _histograms(ax, groups, kind, "sqrt(||e|| + 1) - 1")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def diagnosis_histograms(path: str, title: str, values: dict[str, list[dict[str, dict[str, np.ndarray]]]],
                         quantities: dict[str, str]) -> str:
    """One row per level, one column per (quantity, kind): histograms of the normal and
    abnormal patches' values. values: kind -> per level -> quantity -> group -> (n,)."""
    kinds = list(values)
    n_levels = len(values[kinds[0]])
    cols = [(q, k) for q in quantities for k in kinds]
    fig, axes = plt.subplots(n_levels, len(cols), figsize=(3.2 * len(cols), 2.8 * n_levels), squeeze=False)
    for li in range(n_levels):
        for ax, (q, k) in zip(axes[li], cols):
            _histograms(ax, values[k][li][q], f"{level_name(li)} {k}", quantities[q])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
