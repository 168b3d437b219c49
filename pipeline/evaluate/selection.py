"""Model selection: the selection metric, its value on the ``split: val`` sources only, and
for a registered model version the champion/challenger decision."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from pipeline.config import Config, EvalSpec
from pipeline.evaluate.model import ModelRef
from pipeline.evaluate.results import METRICS
from shards.errors import UserError

log = logging.getLogger(__name__)


def check_selection_metric(spec: EvalSpec) -> tuple[str, str, str]:
    """``eval.selection_metric`` as (method, kind, metric), each one the config evaluates."""
    parts = spec.selection_metric.split("/")
    ok = (len(parts) == 3 and parts[0] in spec.methods and parts[1] in spec.kinds and parts[2] in METRICS)
    if not ok:
        raise UserError(
            f"eval.selection_metric {spec.selection_metric!r} must be METHOD/KIND/METRIC with METHOD in "
            f"eval.methods {list(spec.methods)}, KIND in eval.kinds {list(spec.kinds)} and METRIC one of "
            f"{', '.join(METRICS)}"
        )
    return parts[0], parts[1], parts[2]


def selection_value(rows: list[dict[str, Any]], metric: str) -> float | None:
    """Mean over the classes of the val sources of ``method/kind/metric`` (None if none has it)."""
    method, kind, name = metric.split("/")
    vals = [r[name] for r in rows if r["split"] == "val" and r["class"] != "mean"
            and r["method"] == method and r["kind"] == kind and r[name] is not None]
    return float(np.mean(vals)) if vals else None


def select_model(cfg: Config, ref: ModelRef, rows: list[dict[str, Any]], decide: bool) -> dict | None:
    """The selection value of the evaluated model and, with ``decide``, the decision on its
    registered version; None when the value is not available on the val sources."""
    from pipeline.tracking import select_champion

    value = selection_value(rows, cfg.eval.selection_metric)
    if value is None or not math.isfinite(value):
        log.warning("model selection: %s is not available on the val sources; no decision",
                    cfg.eval.selection_metric)
        return None
    selection = {"metric": cfg.eval.selection_metric, "new_value": value, "champion_value": None,
                 "version": ref.version, "decision": None}
    if decide:
        selection.update(select_champion(cfg.tracking, ref.version, cfg.eval.selection_metric, value))
    return selection
