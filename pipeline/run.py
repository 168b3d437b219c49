"""`adpretrain run`: the whole chain on one config, each stage skipped when its output exists.

    data (synthetic sources whose root is missing) -> shards -> reference bank -> centers
    -> pretraining (Ray Train + DeepSpeed) -> evaluation jobs -> validation curve (eval.curve) -> report

Every stage is a module of :mod:`pipeline.stages`, the same its own command runs; this
module only orders them, shares one :class:`~pipeline.stages.Context` between them and
times them. What `adpretrain run` prints is :meth:`ChainResult.describe`.
"""

from __future__ import annotations

import logging
import time

from pipeline.config import Config
from pipeline.stages import Context, centers, curve, evaluate, pretrain, refbank, report, shards, synth
from pipeline.stages.report import ChainResult

log = logging.getLogger(__name__)

CHAIN = (synth, shards, refbank, centers, pretrain, evaluate, curve, report)


def run_chain(cfg: Config) -> ChainResult:
    """Run every stage of :data:`CHAIN` in order; each writes only what is missing."""
    ctx = Context(progress=True)
    for i, stage in enumerate(CHAIN, 1):
        log.info("== [%d/%d] %s ==", i, len(CHAIN), stage.NAME)
        t0 = time.perf_counter()
        ctx.outputs[stage.NAME] = written = stage.run(cfg, ctx)
        status = stage.summary(written)
        ctx.timings.append((stage.NAME, time.perf_counter() - t0, status))
        log.info("== [%d/%d] %s: %s (%.1f s) ==", i, len(CHAIN), stage.NAME, status, ctx.timings[-1][1])
    return ChainResult(cfg, ctx)
