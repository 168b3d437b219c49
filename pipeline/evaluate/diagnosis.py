"""Why one method can gain while another loses: patch-feature statistics on the val sources.

From the features the evaluation already computed for a class of a ``split: val`` source
(never of the reported ``split: eval`` ones), per level and feature kind, two values of
every test patch, split into normal and abnormal patches (labels: the mask resized to the
grid by nearest neighbour, as for the patch-score histograms; abnormal images without a
mask are left out):

- ``norm``: the L2 norm of the patch feature, as FeatureNorm sees it (its score
  sqrt(||e|| + 1) - 1 is increasing in the norm, so it ranks patches the same way);
- ``nn``: the L2 distance to the nearest normal patch of the class's fit set, as PatchCore
  sees the features (the level's 3x3 mean, :func:`~pipeline.evaluate.patchcore.aggregate`),
  against every fit patch (no coreset). The fit set is the normal training images other
  than the K references: the K references themselves cannot serve, because their residual
  features are their differences from themselves.

Each is summarised per group (patches, mean, std, quantiles 5/50/95), with the AUROC of the
value as a patch score (abnormal against normal patches) and the ratio of the medians
abnormal / normal. The files: ``diagnosis.json`` (every (source, class, level, kind), and the
means over the val classes) and ``pictures/diagnosis/diagnosis.png`` (histograms pooled over
the val classes), in the evaluation's output folder and its MLflow run.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from pipeline.evaluate.model import ModelRef
from pipeline.levels import level_name

QUANTITIES = {"nn": "distance to the nearest normal fit patch", "norm": "L2 norm"}
GROUPS = ("normal", "abnormal")
QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}
JSON_FILE = "diagnosis.json"
PICTURE = os.path.join("pictures", "diagnosis", "diagnosis.png")

Values = dict[str, list[dict[str, dict[str, np.ndarray]]]]
"""kind -> per level -> quantity (nn, norm) -> group (normal, abnormal) -> patch values."""


def split_patches(score: torch.Tensor, labels: np.ndarray, masks: np.ndarray | None) -> dict[str, np.ndarray]:
    """(N, h, w) patch values of the test images -> {"normal": (n,), "abnormal": (m,)}: patch
    labels from the masks resized to the grid by nearest neighbour; without masks, only the
    patches of normal images (those of abnormal images cannot be labelled)."""
    from pipeline.transforms import patch_labels

    keep = labels == 0 if masks is None else np.ones(len(labels), bool)
    if masks is None:
        abnormal = torch.zeros(score.shape, dtype=torch.bool)
    else:
        abnormal = patch_labels(torch.from_numpy(masks), score.shape[-1], "nearest")
    s, a = score.cpu()[torch.from_numpy(keep)], abnormal[torch.from_numpy(keep)]
    return {"normal": s[~a].numpy(), "abnormal": s[a].numpy()}


def _nearest_normal(fit: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """(N, h, w) distance of every test patch to its nearest fit patch, on PatchCore's 3x3 means."""
    from pipeline.evaluate.patchcore import aggregate, nearest_torch

    memory = aggregate([fit]).flatten(0, 2)
    emb = aggregate([test])
    return nearest_torch(emb.flatten(0, 2), memory).view(emb.shape[:3])


@torch.no_grad()
def class_values(fit: dict[str, list[torch.Tensor]], test: dict[str, list[torch.Tensor]], labels: np.ndarray,
                 masks: np.ndarray | None, device: torch.device) -> Values:
    """The ``nn`` and ``norm`` values of every test patch of one class, per kind and level,
    computed on ``device``; ``fit``/``test``: kind -> per level (B, C, h, w) features."""
    out: Values = {}
    for kind in test:
        out[kind] = []
        for f_fit, f_test in zip(fit[kind], test[kind]):
            f_fit, f_test = f_fit.to(device).float(), f_test.to(device).float()
            values = {"nn": _nearest_normal(f_fit, f_test), "norm": torch.linalg.vector_norm(f_test, dim=1)}
            out[kind].append({q: split_patches(v, labels, masks) for q, v in values.items()})
    return out


def summarise(groups: dict[str, np.ndarray]) -> dict[str, Any]:
    """Statistics of the normal and abnormal values, the AUROC of the value as a patch score,
    and the ratio of the medians abnormal / normal (None where a group is empty)."""
    from pipeline.evaluate.metrics import image_metrics

    out: dict[str, Any] = {}
    for g in GROUPS:
        v = groups[g].astype(np.float64)
        stats = {"patches": int(v.size), "mean": None, "std": None, **{k: None for k in QUANTILES}}
        if v.size:
            stats.update(mean=float(v.mean()), std=float(v.std()),
                         **{k: float(q) for k, q in zip(QUANTILES, np.quantile(v, list(QUANTILES.values())))})
        out[g] = stats
    scores = np.concatenate([groups["normal"], groups["abnormal"]]).astype(np.float64)
    y = np.concatenate([np.zeros(groups["normal"].size), np.ones(groups["abnormal"].size)])
    out["auroc"] = image_metrics(scores, y)["image_auroc"]
    med_n, med_a = out["normal"]["q50"], out["abnormal"]["q50"]
    out["median_ratio"] = med_a / med_n if med_a is not None and med_n else None
    return out


MEAN_FIELDS = {"nn_auroc": ("nn", "auroc"), "norm_auroc": ("norm", "auroc"),
               "nn_median_normal": ("nn", "normal", "q50"), "nn_median_abnormal": ("nn", "abnormal", "q50"),
               "nn_median_ratio": ("nn", "median_ratio"),
               "norm_median_normal": ("norm", "normal", "q50"), "norm_median_abnormal": ("norm", "abnormal", "q50")}
"""The columns of the means over the val classes: name -> where in a class entry."""


def _field(entry: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        entry = entry[p]
    return entry


def means_over_classes(entries: list[dict]) -> list[dict[str, Any]]:
    """Per (level, kind): the mean over the val classes of every :data:`MEAN_FIELDS` value
    (classes without it left out; None when none has it)."""
    out = []
    for key in dict.fromkeys((e["level"], e["kind"]) for e in entries):
        group = [e for e in entries if (e["level"], e["kind"]) == key]
        row: dict[str, Any] = {"level": key[0], "kind": key[1], "classes": len(group)}
        for name, path in MEAN_FIELDS.items():
            vals = [_field(e, path) for e in group if _field(e, path) is not None]
            row[name] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out


def document(infos: list, model: ModelRef, backbone_levels: list) -> dict[str, Any]:
    """The JSON document of the val classes' diagnoses (``infos``: ClassInfo of every class) of
    ``model``'s evaluation."""
    entries = [{"source": i.source, "class": i.cls, "level": level_name(li), "kind": kind,
                **{q: summarise(groups[q]) for q in QUANTITIES}}
               for i in infos if i.diagnosis is not None
               for kind, per_level in i.diagnosis.items() for li, groups in enumerate(per_level)]
    return {"model": model.label, "model_version": model.version and f"{model.name}/{model.version}",
            "backbone_levels": backbone_levels, "quantities": QUANTITIES,
            "patch_labels": "mask resized to the feature grid by nearest neighbour",
            "nn_reference": "every patch of the class's fit set (normal training images other than the K "
                            "references), 3x3 mean per level as PatchCore aggregates, L2",
            "classes": entries, "means": means_over_classes(entries)}


def pooled(infos: list) -> Values:
    """The values of every val class concatenated, per kind, level, quantity and group."""
    diags = [i.diagnosis for i in infos if i.diagnosis is not None]
    return {kind: [{q: {g: np.concatenate([d[kind][li][q][g] for d in diags]) for g in GROUPS} for q in QUANTITIES}
                   for li in range(len(per_level))]
            for kind, per_level in diags[0].items()}


def write_diagnosis(folder: str, infos: list, model: ModelRef, backbone_levels: list) -> dict[str, str]:
    """``diagnosis.json`` and its picture in ``folder`` when a val class was evaluated: name -> file."""
    from pipeline.evaluate.pictures import diagnosis_histograms

    if not any(i.diagnosis is not None for i in infos):
        return {}
    with open(os.path.join(folder, JSON_FILE), "w") as f:
        json.dump(document(infos, model, backbone_levels), f, indent=1)
    diagnosis_histograms(os.path.join(folder, PICTURE), "val sources, test patches pooled over the classes",
                         pooled(infos), QUANTITIES)
    return {"diagnosis": JSON_FILE, "diagnosis_picture": PICTURE}
