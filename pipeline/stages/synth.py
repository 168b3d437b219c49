"""The data stage: generate the synthetic data of every source with a ``synth:`` section whose
root does not exist yet (:func:`shards.synth.generate_source`); sources with a root are left alone."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.stages import Context
from shards.synth import generate_missing, needs_generating

NAME = "data"


def done(cfg: Config, ctx: Context) -> bool:
    """Every source that asks for synthetic data has its root."""
    return not any(needs_generating(s) for s in cfg.sources)


def run(cfg: Config, ctx: Context) -> list[str]:
    """Generate the missing synthetic sources; returns the names of those generated."""
    return generate_missing(cfg.sources, ctx.progress)


def summary(generated: list[str]) -> str:
    return f"generated {', '.join(generated)}" if generated else "skipped (roots exist)"
