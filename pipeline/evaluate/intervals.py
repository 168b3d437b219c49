"""How sure a difference of image AUROC is: paired, stratified bootstrap intervals.

A val or eval class has a few dozen test images, so one image moves a class's AUROC by a few
hundredths and a single comparison of two kinds can come out either way. For every
(split, source, method) and every kind against every other one, the interval of
``mean over classes of AUROC(kind) - AUROC(other)`` resamples the test images of each class
with replacement, normal and abnormal images separately (their numbers stay fixed), the same
resample for both kinds (the comparison is paired: both kinds scored the same images).

The gate (``pipeline.evaluate.selection``) still compares the point values; the intervals say
which of its comparisons, and which held-out differences, are evidence and which are noise.

``scipy.stats.bootstrap`` resamples one sample or several independent ones; here the draws are
stratified by label within each class and shared by two statistics, so the resampling is
written out: a resample is a vector of counts per image, and the AUROC of a resample is
``c1 . P . c0 / (n1 n0)`` with P the pairwise win matrix of the class (ties count one half).
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from pipeline.evaluate.cells import Cell
    from pipeline.evaluate.features import ClassInfo

RESAMPLES = 2000
LEVEL = 0.95


def win_matrix(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n_abnormal, n_normal): 1 where the abnormal image scores above the normal one, 0.5 on a tie."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    a, n = s[y][:, None], s[~y][None, :]
    return (a > n) + 0.5 * (a == n)


def counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, n) how often each of n items occurs in each row of (B, m) drawn indices."""
    rows = idx.shape[0]
    flat = (idx + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def resampled_auroc(wins: np.ndarray, idx_abnormal: np.ndarray, idx_normal: np.ndarray) -> np.ndarray:
    """(B,) AUROC of each resample: rows of ``idx_abnormal`` / ``idx_normal`` index the abnormal
    and normal images of the class (the rows and columns of ``wins``)."""
    c1, c0 = counts(idx_abnormal, wins.shape[0]), counts(idx_normal, wins.shape[1])
    return ((c1 @ wins) * c0).sum(1) / (idx_abnormal.shape[1] * idx_normal.shape[1])


def paired_interval(classes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], resamples: int = RESAMPLES,
                    level: float = LEVEL, seed: int = 0) -> dict[str, float]:
    """``classes``: per class (labels, scores of the kind, scores of the other kind). The mean over
    classes of the AUROC difference, and its percentile interval at ``level``."""
    rng = np.random.default_rng(seed)
    diff = np.zeros(resamples)
    point = 0.0
    for labels, a, b in classes:
        y = np.asarray(labels).astype(bool)
        n1, n0 = int(y.sum()), int((~y).sum())
        wa, wb = win_matrix(a, y), win_matrix(b, y)
        point += wa.mean() - wb.mean()
        i1, i0 = rng.integers(0, n1, (resamples, n1)), rng.integers(0, n0, (resamples, n0))
        diff += resampled_auroc(wa - wb, i1, i0)
    k = len(classes)
    lo, hi = np.quantile(diff / k, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(point / k), "low": float(lo), "high": float(hi)}


Scores = dict[tuple[str, str, str, str], dict[str, tuple[np.ndarray, np.ndarray]]]


def class_scores(infos: list[ClassInfo], cells: list[Cell]) -> Scores:
    """(split, source, method, kind) -> class -> (labels, image scores), for the classes that have
    an image AUROC (normal and abnormal test images)."""
    labels = {(i.source, i.cls): i.labels for i in infos}
    out: Scores = {}
    for c in cells:
        y = labels[c.source, c.cls]
        if y.any() and not y.all():
            out.setdefault((c.role, c.source, c.method, c.kind), {})[c.cls] = (y, c.scores)
    return out


def _interval(scores: Scores, keys: list[tuple[str, str, str]], kind: str, other: str, seed: int) -> dict[str, Any]:
    """Over the classes of the (split, source, method) ``keys`` that both kinds scored."""
    classes = []
    for split, source, method in keys:
        a, b = scores.get((split, source, method, kind), {}), scores.get((split, source, method, other), {})
        classes += [(y, sa, b[cls][1]) for cls, (y, sa) in a.items() if cls in b]
    return {"classes": len(classes), **(paired_interval(classes, seed=seed) if classes else {})}


def interval_rows(scores: Scores, seed: int = 0) -> list[dict[str, Any]]:
    """For every (split, source, method) and ordered pair of its kinds: the difference of the mean
    image AUROC over the classes and its interval."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for split, source, method, kind in scores:
        groups.setdefault((split, source, method), []).append(kind)
    rows = []
    for key, kinds in groups.items():
        for kind, other in combinations(kinds, 2):
            iv = _interval(scores, [key], kind, other, seed)
            if iv["classes"]:  # the reverse comparison is the same resamples with the sign flipped
                mirror = {"classes": iv["classes"], "diff": -iv["diff"], "low": -iv["high"], "high": -iv["low"]}
                rows += [{"split": key[0], "source": key[1], "method": key[2], "kind": a, "against": b, **v}
                         for a, b, v in ((kind, other, iv), (other, kind, mirror))]
    return rows


def split_interval(scores: Scores, split: str, method: str, kind: str, other: str, seed: int = 0) -> dict[str, Any]:
    """The interval over every class of every source of ``split`` (what the gate's values average)."""
    keys = sorted({(sp, src, m) for sp, src, m, _ in scores if sp == split and m == method})
    return _interval(scores, keys, kind, other, seed)


def markdown(rows: list[dict[str, Any]], kind: str = "pretrained") -> str:
    """The rows of ``kind`` against every other kind, as a Markdown table."""
    head = f"| split | source | method | {kind} against | classes | difference | {LEVEL:.0%} interval | evidence |"
    lines = [head, "| --- | --- | --- | --- | ---: | ---: | --- | --- |"]
    for r in rows:
        if r["kind"] != kind:
            continue
        sure = "better" if r["low"] > 0 else "worse" if r["high"] < 0 else "not sure"
        lines.append(f"| {r['split']} | {r['source']} | {r['method']} | {r['against']} | {r['classes']} | "
                     f"{r['diff']:+.3f} | [{r['low']:+.3f}, {r['high']:+.3f}] | {sure} |")
    return "\n".join(lines)
