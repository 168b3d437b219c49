"""The validation-curve stage, after evaluation: with ``eval.curve``, every training checkpoint of
this config's pretraining run evaluated on the val sources (:func:`pipeline.evaluate.curve.build_curve`;
``adpretrain curve`` draws it whatever ``eval.curve`` says).

It has no ``done`` of its own: each checkpoint's evaluation is kept in a folder keyed by what it
is computed from and reused, so a rerun evaluates only what is missing; the curve's files and
its MLflow run are written anew from them.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.evaluate.curve import CurveResult, build_curve
from pipeline.stages import Context

NAME = "curve"


def run(cfg: Config, ctx: Context) -> CurveResult | None:
    """The validation curve when ``eval.curve`` is on; None otherwise."""
    return build_curve(cfg, progress=ctx.progress) if cfg.eval.curve else None


def summary(result: CurveResult | None) -> str:
    if result is None:
        return "off (eval.curve: false)"
    return f"{len(result.points)} checkpoints ({len(result.evaluated)} evaluated, {len(result.reused)} reused)"
