"""The evaluation stage, after pretraining: :func:`pipeline.evaluate.jobs.evaluate` on the
export of this config's pretraining run.

It has no ``done``: it runs every time. Its outcome is not a function of its inputs alone:
the model-selection decision compares the export with the registry's champion as the
registry stands at that moment (another run may have moved the alias since); and the report
is drawn from the result it returns.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.evaluate.jobs import evaluate
from pipeline.evaluate.results import EvalResult
from pipeline.stages import Context

NAME = "evaluate"


def run(cfg: Config, ctx: Context) -> EvalResult:
    """Evaluate the config's own export; the champion/challenger alias moved as ``eval`` says."""
    return evaluate(cfg)


def summary(result: EvalResult) -> str:
    sel = result.selection
    return f"alias {sel['decision']}" if sel else "done"
