"""The val sources' diagnosis (pipeline/evaluate/diagnosis.py): norms and nearest-normal
distances of normal and abnormal test patches against a slow float64 implementation written
here (3x3 means by explicit neighbour loops, distances by torch.cdist, quantiles by
interpolating the sorted values, AUROC by counting pairs), planted anomalies with a known
AUROC, and a real evaluation whose JSON, picture, MLflow artifacts and report hold it."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.evalspec import KINDS
from pipeline.evaluate.diagnosis import GROUPS, QUANTITIES, class_values, summarise
from tiny_chain import shards_and_export, tiny_chain_config

CPU = torch.device("cpu")
GRID, SCALE = 6, 4  # a 6x6 feature grid of 24x24-pixel images: one cell is 4x4 pixels
WIDTHS = (5, 7)


# ---------------------------------------------------------------- the slow float64 reference


def mean3x3(f: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> the mean of each patch's valid 3x3 neighbours, by explicit loops, float64."""
    b, c, h, w = f.shape
    x = f.double()
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            cells = [x[:, :, a, bb] for a in range(i - 1, i + 2) for bb in range(j - 1, j + 2)
                     if 0 <= a < h and 0 <= bb < w]
            out[:, :, i, j] = sum(cells) / len(cells)
    return out


def cell_labels(masks: np.ndarray | None, labels: np.ndarray, h: int, w: int) -> list[tuple[int, int, int, bool]]:
    """(image, row, col, abnormal) of every patch to keep: a cell takes the label of its
    top-left pixel (nearest-neighbour resizing of a mask whose side is a multiple of the
    grid's); without masks, the patches of normal images only."""
    out = []
    for n in range(len(labels)):
        if masks is None and labels[n]:
            continue
        side = None if masks is None else masks.shape[-1]
        for i in range(h):
            for j in range(w):
                abn = masks is not None and bool(masks[n, i * side // h, j * side // w])
                out.append((n, i, j, abn))
    return out


def reference_values(fit: torch.Tensor, test: torch.Tensor, labels, masks) -> dict:
    """quantity -> group -> sorted float64 values, computed the slow way."""
    _, c, h, w = test.shape
    memory = mean3x3(fit).permute(0, 2, 3, 1).reshape(-1, c)
    agg = mean3x3(test)
    out = {q: {g: [] for g in GROUPS} for q in QUANTITIES}
    for n, i, j, abn in cell_labels(masks, labels, h, w):
        g = GROUPS[int(abn)]
        out["nn"][g].append(float(torch.cdist(agg[n, :, i, j][None], memory).min()))
        out["norm"][g].append(math.sqrt(sum(float(v) ** 2 for v in test[n, :, i, j].double())))
    return {q: {g: np.sort(np.asarray(v, dtype=np.float64)) for g, v in d.items()} for q, d in out.items()}


def quantile(sorted_v: np.ndarray, q: float) -> float:
    pos = (sorted_v.size - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, sorted_v.size - 1)
    return float(sorted_v[lo] + (pos - lo) * (sorted_v[hi] - sorted_v[lo]))


def pair_auroc(normal: np.ndarray, abnormal: np.ndarray) -> float:
    wins = sum(float(a > n) + 0.5 * float(a == n) for a in abnormal for n in normal)
    return wins / (normal.size * abnormal.size)


def check_summary(got: dict, ref: dict[str, np.ndarray], rel: float = 1e-5) -> None:
    for g in GROUPS:
        v = ref[g]
        assert got[g]["patches"] == v.size
        m = sum(v) / v.size
        assert got[g]["mean"] == pytest.approx(m, rel=rel)
        assert got[g]["std"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in v) / v.size), rel=10 * rel, abs=1e-6)
        for key, q in (("q05", 0.05), ("q50", 0.5), ("q95", 0.95)):
            assert got[g][key] == pytest.approx(quantile(v, q), rel=rel), (g, key)
    assert got["auroc"] == pytest.approx(pair_auroc(ref["normal"], ref["abnormal"]), abs=1e-12)
    assert got["median_ratio"] == pytest.approx(quantile(ref["abnormal"], 0.5) / quantile(ref["normal"], 0.5), rel=rel)


# ---------------------------------------------------------------- synthetic features


def synthetic(seed: int, shift: float, n_fit: int = 3, n_test: int = 6) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Three kinds of per-level features; the last half of the test images abnormal, each with
    a 2x2-cell defect (masks constant on cells) whose features are shifted by ``shift`` in
    every channel of ``raw`` and ``residual``, and set to zero in ``pretrained``."""
    g = torch.Generator().manual_seed(seed)
    labels = np.array([0] * (n_test // 2) + [1] * (n_test - n_test // 2))
    masks = np.zeros((n_test, GRID * SCALE, GRID * SCALE), bool)
    fit, test = {}, {}
    for kind in KINDS:
        fit[kind] = [1.0 + torch.randn(n_fit, c, GRID, GRID, generator=g) for c in WIDTHS]
        test[kind] = [1.0 + torch.randn(n_test, c, GRID, GRID, generator=g) for c in WIDTHS]
    for n in np.flatnonzero(labels):
        i, j = (int(v) for v in torch.randint(0, GRID - 1, (2,), generator=g))
        masks[n, i * SCALE : (i + 2) * SCALE, j * SCALE : (j + 2) * SCALE] = True
        for kind in KINDS:
            for f in test[kind]:
                if kind == "pretrained":
                    f[n, :, i : i + 2, j : j + 2] = 0.0
                else:
                    f[n, :, i : i + 2, j : j + 2] += shift
    return fit, test, labels, masks


@pytest.mark.parametrize("seed", [0, 1])
def test_values_and_summaries_equal_the_float64_reference(seed: int) -> None:
    """A small shift: normal and abnormal values overlap, the AUROCs lie strictly inside (0, 1)."""
    fit, test, labels, masks = synthetic(seed, shift=0.6)
    got = class_values(fit, test, labels, masks, CPU)
    assert set(got) == set(KINDS) and all(len(got[k]) == len(WIDTHS) for k in KINDS)
    aurocs = []
    for kind in ("raw", "residual"):
        for li in range(len(WIDTHS)):
            ref = reference_values(fit[kind][li], test[kind][li], labels, masks)
            for q in QUANTITIES:
                for g in GROUPS:
                    np.testing.assert_allclose(np.sort(got[kind][li][q][g]), ref[q][g], rtol=1e-5, atol=1e-5)
                summary = summarise(got[kind][li][q])
                check_summary(summary, ref[q])
                aurocs.append(summary["auroc"])
    assert all(0.5 < a < 1.0 for a in aurocs), aurocs


def test_planted_anomalies_have_the_known_auroc() -> None:
    """Abnormal cells shifted far away: both values rank every abnormal patch above every normal
    one (AUROC 1; the 3x3 mean of an abnormal cell holds more abnormal cells than any normal
    cell's does). Abnormal cells set to zero: the norm ranks them below every normal patch."""
    fit, test, labels, masks = synthetic(2, shift=50.0)
    got = class_values(fit, test, labels, masks, CPU)
    for li in range(len(WIDTHS)):
        for kind in ("raw", "residual"):
            for q in QUANTITIES:
                s = summarise(got[kind][li][q])
                assert s["auroc"] == 1.0 and s["median_ratio"] > 5.0, (kind, li, q, s)
        zero = summarise(got["pretrained"][li]["norm"])
        assert zero["auroc"] == 0.0 and zero["abnormal"]["q95"] == 0.0 and zero["median_ratio"] == 0.0
    n_abnormal = 4 * int(labels.sum())
    assert got["raw"][0]["nn"]["abnormal"].size == n_abnormal
    assert got["raw"][0]["nn"]["normal"].size == len(labels) * GRID * GRID - n_abnormal


def test_without_masks_only_normal_images_count() -> None:
    """An image-level-only source: the patches of abnormal images cannot be labelled, so they are
    left out; no AUROC and no ratio (None, never 0)."""
    fit, test, labels, _ = synthetic(3, shift=5.0)
    got = class_values(fit, test, labels, None, CPU)
    ref = reference_values(fit["raw"][1], test["raw"][1], labels, None)
    for q in QUANTITIES:
        s = summarise(got["raw"][1][q])
        assert s["abnormal"]["patches"] == 0 and s["abnormal"]["q50"] is None
        assert s["auroc"] is None and s["median_ratio"] is None
        assert s["normal"]["patches"] == int((labels == 0).sum()) * GRID * GRID
        assert s["normal"]["q50"] == pytest.approx(quantile(ref[q]["normal"], 0.5), rel=1e-5)


# ---------------------------------------------------------------- a real evaluation


def _config(tmp: str) -> dict:
    return tiny_chain_config(tmp, "diagtest", eval={"k_shot": 2, "methods": ["featurenorm", "patchcore"], "gate": {},
                                                    "selection_metric": "patchcore/pretrained/image_auroc"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    """Shards of an eval and a val source, a pretraining run in MLflow, and its export (the real
    EfficientNet-Lite0 weights, a randomly initialised projector)."""
    from pipeline.config import load_config
    from pipeline.paths import export_dir

    tmp = str(tmp_path_factory.mktemp("diagnosis"))
    cfg = load_config(_config(tmp))
    shards_and_export(cfg)
    return SimpleNamespace(cfg=cfg, export=export_dir(cfg))


def _val_features(setup) -> tuple[list, object]:
    """The val class's features of every kind and its ClassInfo, from the evaluation's own path."""
    from pipeline.evaluate.features import ExportBlob, class_features
    from pipeline.evaluate.plan import decode_shard, plan_work, select_sources

    [(_, shards_of, [plan])] = plan_work(setup.cfg, select_sources(setup.cfg, ["valset"]))
    shards = [decode_shard(u, n, setup.cfg.backbone.image_size) for u, n in shards_of]
    *per_kind, info = class_features(ExportBlob.read(setup.export), plan, KINDS, CPU, *shards)
    return per_kind, info


def test_evaluation_writes_the_val_diagnosis_and_the_report_shows_it(setup):
    from mlflow.tracking import MlflowClient

    from pipeline.evaluate.jobs import evaluate
    from pipeline.paths import report_dir
    from pipeline.report import write_report
    from pipeline.stages import Context
    from pipeline.stages.report import ChainResult
    from pipeline.tracking import resolve_uri

    cfg = setup.cfg
    result = evaluate(cfg, parallel=False, progress=False)
    with open(result.files["diagnosis"]) as f:
        doc = json.load(f)
    # the val class only, never the reported evaluation's; every level and kind
    assert {(e["source"], e["class"]) for e in doc["classes"]} == {("valset", "synth_tile")}
    assert {(e["level"], e["kind"]) for e in doc["classes"]} == {(f"level{i}", k) for i in range(2) for k in KINDS}
    assert doc["backbone_levels"] == [2, 3] and doc["model"] == result.model and doc["model_version"] is None

    # the numbers, against the slow float64 reference on the same features
    per_kind, info = _val_features(setup)
    entry = {(e["level"], e["kind"]): e for e in doc["classes"]}
    for kind, (fit, test) in zip(KINDS, per_kind):
        for li in range(2):
            ref = reference_values(fit[li], test[li], info.labels, info.masks)
            for q in QUANTITIES:
                check_summary(entry[f"level{li}", kind][q], ref[q], rel=1e-4)
    e = entry["level0", "raw"]
    assert e["nn"]["normal"]["patches"] + e["nn"]["abnormal"]["patches"] == len(info.labels) * test[0][0, 0].numel()
    assert e["nn"]["abnormal"]["patches"] > 0
    for row in doc["means"]:  # one val class: its means are its own values
        one = entry[row["level"], row["kind"]]
        assert (row["classes"], row["nn_auroc"], row["norm_median_abnormal"]) == \
            (1, one["nn"]["auroc"], one["norm"]["abnormal"]["q50"])

    # the picture, and both files in the evaluation's MLflow run
    with open(result.files["diagnosis_picture"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "diagnosis (val)" in result.describe()
    uri = resolve_uri(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    assert "evaluation/diagnosis.json" in {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {a.path for a in client.list_artifacts(result.run_id, "evaluation/pictures/diagnosis")} == \
        {"evaluation/pictures/diagnosis/diagnosis.png"}

    # the report: the table of the means and the picture
    ctx = Context()
    ctx.outputs["evaluate"] = result
    page = open(write_report(cfg, ChainResult(cfg, ctx))).read()
    assert '<img src="diagnosis/diagnosis.png">' in page and "Diagnosis (validation source)" in page
    assert os.path.getsize(os.path.join(report_dir(cfg), "diagnosis", "diagnosis.png")) > 1000
    for row in doc["means"]:
        assert f'<td class="l">{row["level"]}</td><td class="l">{row["kind"]}</td><td>{row["nn_auroc"]:.3f}</td>' \
            f'<td>{row["norm_auroc"]:.3f}</td>' in page
