"""The bootstrap intervals of image-AUROC differences (pipeline.evaluate.intervals): each
resample's AUROC against a slow float64 loop over the resampled images, the point value against
the evaluation's own metric, the interval's behaviour (paired, stratified, reproducible,
narrowing with more images), the grouping of cells into rows, and the gate's report."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.evalspec import EvalSpec
from pipeline.evaluate import intervals as iv
from pipeline.evaluate.metrics import image_metrics
from pipeline.evaluate.selection import gate_checks


def _slow_auroc(abnormal: np.ndarray, normal: np.ndarray) -> float:
    total = 0.0
    for a in abnormal.astype(np.float64):
        for n in normal.astype(np.float64):
            total += 1.0 if a > n else 0.5 if a == n else 0.0
    return total / (len(abnormal) * len(normal))


def _class(rng, n0: int, n1: int, shift: float):
    """Labels and scores with ties (rounded), the abnormal ones shifted up by ``shift``."""
    y = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    rng.shuffle(y)
    s = np.round(rng.normal(size=y.size) + shift * y, 1)
    return y, s


def test_each_resampled_auroc_equals_a_loop_over_the_resampled_images():
    rng = np.random.default_rng(0)
    y, s = _class(rng, 9, 14, 0.7)
    ab, no = s[y == 1], s[y == 0]
    i1, i0 = rng.integers(0, 14, (40, 14)), rng.integers(0, 9, (40, 9))
    got = iv.resampled_auroc(iv.win_matrix(s, y), i1, i0)
    want = [_slow_auroc(ab[i1[b]], no[i0[b]]) for b in range(40)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # the resample that keeps every image once is the class's AUROC, as the evaluation computes it
    full = iv.resampled_auroc(iv.win_matrix(s, y), np.arange(14)[None], np.arange(9)[None])
    assert full[0] == pytest.approx(image_metrics(s, y)["image_auroc"], abs=1e-12)


def test_the_interval_is_paired_stratified_and_reproducible():
    rng = np.random.default_rng(1)
    classes = [_class(rng, 12, 24, 0.5) for _ in range(3)]
    # the same scores for both kinds: every resample's difference is exactly 0
    same = iv.paired_interval([(y, s, s) for y, s in classes])
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}
    # a kind that is the other plus noise: the point is the mean of the class differences, inside the interval
    other = [(y, s, s + rng.normal(scale=0.8, size=s.size)) for y, s in classes]
    out = iv.paired_interval(other, seed=3)
    want = np.mean([image_metrics(a, y)["image_auroc"] - image_metrics(b, y)["image_auroc"] for y, a, b in other])
    assert out["diff"] == pytest.approx(want, abs=1e-12)
    assert out["low"] < out["diff"] < out["high"]
    assert iv.paired_interval(other, seed=3) == out and iv.paired_interval(other, seed=4) != out
    # a kind that ranks every abnormal image above every normal one, against chance: sure better
    perfect = [(y, y.astype(float), rng.normal(size=y.size)) for y, _ in classes]
    assert iv.paired_interval(perfect)["low"] > 0.2
    # more test images: a narrower interval for the same kind of difference
    def width(n0, n1):
        r = np.random.default_rng(5)
        cls = [(y, s, s + r.normal(scale=0.8, size=s.size)) for y, s in (_class(r, n0, n1, 0.5) for _ in range(3))]
        o = iv.paired_interval(cls)
        return o["high"] - o["low"]
    assert width(120, 240) < 0.5 * width(12, 24)


def _cells():
    """Two val sources and an eval source; class 'one' of source v1 has no normal test image."""
    rng = np.random.default_rng(2)
    infos, cells = [], []
    for role, source, classes in (("val", "v1", ("a", "one")), ("val", "v2", ("b",)), ("eval", "e", ("c",))):
        for cls in classes:
            y, s = _class(rng, 10, 20, 0.6)
            if cls == "one":
                y = np.ones_like(y)
            infos.append(SimpleNamespace(source=source, cls=cls, labels=y))
            for method in ("patchcore", "padim"):
                for kind, noise in (("raw", 1.0), ("pretrained", 0.3)):
                    cells.append(SimpleNamespace(role=role, source=source, cls=cls, method=method, kind=kind,
                                                 scores=s + rng.normal(scale=noise, size=s.size)))
    return infos, cells


def test_rows_cover_every_ordered_pair_of_kinds_per_source_and_method():
    infos, cells = _cells()
    scores = iv.class_scores(infos, cells)
    assert "one" not in scores["val", "v1", "patchcore", "raw"]  # one label: no AUROC, left out
    rows = iv.interval_rows(scores)
    assert {(r["split"], r["source"], r["method"], r["kind"], r["against"]) for r in rows} == {
        (sp, src, m, k, o) for sp, src in (("val", "v1"), ("val", "v2"), ("eval", "e"))
        for m in ("patchcore", "padim") for k, o in (("raw", "pretrained"), ("pretrained", "raw"))}
    assert all(r["classes"] == 1 for r in rows)
    by = {(r["source"], r["method"], r["kind"]): r for r in rows}
    assert by["v1", "padim", "pretrained"]["diff"] == pytest.approx(-by["v1", "padim", "raw"]["diff"])
    # the val interval pools the classes of both val sources, as the gate's values do
    pooled = iv.split_interval(scores, "val", "padim", "pretrained", "raw")
    assert pooled["classes"] == 2
    assert pooled["diff"] == pytest.approx((by["v1", "padim", "pretrained"]["diff"] + by["v2", "padim", "pretrained"]["diff"]) / 2)
    table = iv.markdown(rows)
    assert table.count("\n") == 2 + 6 - 1 and "| val | v2 | padim | raw | 1 |" in table


def test_the_gate_reports_the_interval_of_each_comparison():
    infos, cells = _cells()
    scores = iv.class_scores(infos, cells)
    rows = [{"split": "val", "source": "v", "class": "x", "method": m, "kind": k, "image_auroc": v}
            for m in ("patchcore", "padim") for k, v in (("pretrained", 0.6), ("raw", 0.7))]
    spec = EvalSpec(methods=["patchcore", "padim"], kinds=["raw", "pretrained"])
    out = gate_checks(rows, spec, scores)
    for check in out["checks"]:
        assert check["interval"] == iv.split_interval(scores, "val", check["method"], "pretrained", "raw")
    assert len(out["failed"]) == 2
    assert all("95% interval of the difference [" in line for line in out["failed"])
    assert "interval" not in gate_checks(rows, spec)["checks"][0]
