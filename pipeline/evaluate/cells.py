"""The method cells: one (dataset, class, method, kind) each.

A cell fits one method (behind the :class:`~pipeline.evaluate.methods.Method` interface) on
the fit features of one kind, scores the test images on the task's device, and computes the
metrics on the CPU: image metrics always, pixel metrics only when every abnormal test image
has a mask (otherwise None, reported as n/a, never 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import EvalSpec
from pipeline.evaluate.features import BATCH, ClassInfo
from pipeline.evaluate.threads import computing_on
from shards.errors import DataError


@dataclass
class Cell:
    """One (dataset, class, method, kind): metrics, image scores, maps of the picture images."""

    source: str
    role: str
    cls: str
    method: str
    kind: str
    metrics: dict[str, float | None]
    scores: np.ndarray
    picture_maps: np.ndarray  # (P, S, S)
    seconds: float


def run_cell(method: str, kind: str, spec: EvalSpec, feats: tuple[list[torch.Tensor], list[torch.Tensor]],
             info: ClassInfo, device: torch.device) -> Cell:
    """Fit ``method`` on the fit features of one kind, predict the test images (on ``device``),
    compute metrics (on the CPU)."""
    from pipeline.evaluate.methods import make_method
    from pipeline.evaluate.metrics import image_metrics, pixel_metrics

    start = time.perf_counter()
    fit, test = feats
    with computing_on(device):
        m = make_method(method, spec).fit([f.to(device) for f in fit])
        maps, scores = [], []
        for i in range(0, test[0].shape[0], BATCH):
            mp, sc = m.predict([f[i : i + BATCH].to(device) for f in test], info.size)
            maps.append(mp.cpu())
            scores.append(sc.cpu())
        maps_t, scores_t = torch.cat(maps), torch.cat(scores)
    if not (torch.isfinite(maps_t).all() and torch.isfinite(scores_t).all()):
        raise DataError(f"{method} on {kind} features of {info.source}/{info.cls} gave non-finite scores")
    metrics = {**image_metrics(scores_t, info.labels), **pixel_metrics(maps_t, info.masks)}
    return Cell(info.source, info.role, info.cls, method, kind, metrics, scores_t.numpy(),
                maps_t[info.pictures].numpy(), time.perf_counter() - start)
