"""Model selection on the ``split: val`` sources only: the selection value, the no-regression
gate, and for a registered model version the champion/challenger decision.

The value of ``eval.selection_metric`` = ``M1+M2+.../KIND/METRIC`` is the mean over the methods
of each method's mean over the val classes. The gate (``eval.gate``, kind -> margin) holds when,
for every selection method, KIND's value exceeds each gated kind's value by more than its
margin; a version that fails it is never champion, and the failed comparisons are reported,
each with the bootstrap interval of its difference (``pipeline.evaluate.intervals``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from pipeline.config import Config, EvalSpec
from pipeline.evaluate.intervals import LEVEL, Scores, split_interval
from pipeline.evaluate.model import ModelRef
from shards.errors import UserError

log = logging.getLogger(__name__)


def method_value(rows: list[dict[str, Any]], method: str, kind: str, metric: str) -> float | None:
    """Mean over the classes of the val sources of ``method/kind/metric`` (None if none has it)."""
    vals = [r[metric] for r in rows if r["split"] == "val" and r["class"] != "mean"
            and r["method"] == method and r["kind"] == kind and r[metric] is not None]
    return float(np.mean(vals)) if vals else None


def selection_value(rows: list[dict[str, Any]], spec: EvalSpec) -> float | None:
    """The selection metric: the mean over its methods (None when one of them has no value)."""
    s = spec.selection
    if s is None:
        return None
    vals = [method_value(rows, m, s.kind, s.metric) for m in s.methods]
    return None if any(v is None for v in vals) else float(np.mean(vals))


def gate_checks(rows: list[dict[str, Any]], spec: EvalSpec, scores: Scores | None = None) -> dict[str, Any]:
    """Every comparison of the gate: {"passed", "checks": [...], "failed": [readable lines]}; with
    the classes' image ``scores`` (``intervals.class_scores``), each check of image AUROC holds
    the bootstrap interval of its difference over the val classes."""
    s = spec.selection
    checks, failed = [], []
    for method in s.methods:
        value = method_value(rows, method, s.kind, s.metric)
        for kind, margin in spec.gate_margins.items():
            other = method_value(rows, method, kind, s.metric)
            ok = value is not None and other is not None and value > other + margin
            check = {"method": method, "kind": s.kind, "value": value, "against": kind,
                     "against_value": other, "margin": margin, "passed": ok}
            if scores is not None and s.metric == "image_auroc":
                check["interval"] = split_interval(scores, "val", method, s.kind, kind)
            checks.append(check)
            if not ok:
                failed.append(f"{method}: {s.kind} {_num(value)} does not beat {kind} {_num(other)} + {margin:g} "
                              f"({s.metric} on val{_interval_text(check.get('interval'))})")
    return {"passed": not failed, "checks": checks, "failed": failed}


def _name(spec: EvalSpec) -> str:
    s = spec.selection
    return "none (pretrained features are not evaluated)" if s is None else "+".join(s.methods) + f"/{s.kind}/{s.metric}"


def _interval_text(iv: dict | None) -> str:
    if not iv or "low" not in iv:
        return ""
    return f"; {LEVEL:.0%} interval of the difference [{iv['low']:+.3f}, {iv['high']:+.3f}]"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def select_model(cfg: Config, ref: ModelRef, rows: list[dict[str, Any]], decide: bool,
                 scores: Scores | None = None) -> dict | None:
    """The selection value of the evaluated model, its gate (with intervals given ``scores``) and,
    with ``decide``, the decision on its registered version (``decision_error`` when the registry
    could not take it); None when the value is not available on the val sources."""
    from pipeline.tracking import select_champion

    value = selection_value(rows, cfg.eval)
    if value is None or not math.isfinite(value):
        log.warning("model selection: %s is not available on the val sources; no decision", _name(cfg.eval))
        return None
    gate = gate_checks(rows, cfg.eval, scores)
    for line in gate["failed"]:
        log.warning("model selection gate: %s", line)
    selection = {"metric": _name(cfg.eval), "new_value": value, "champion_value": None,
                 "version": ref.version, "decision": None, "gate": gate}
    if decide:
        try:
            selection.update(select_champion(cfg.tracking, ref.version, cfg.eval.selection.key, value,
                                             gate_failed=gate["failed"]))
        except UserError as e:  # the evaluation is still written; jobs.evaluate raises after that
            selection["decision_error"] = str(e)
    return selection
