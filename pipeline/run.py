"""`adpretrain run`: the whole chain on one config, each stage skipped when its output exists.

    data (synthetic sources whose root is missing) -> shards -> reference bank -> centers
    -> pretraining (Ray Train + DeepSpeed) -> evaluation jobs -> report

Every stage is the same function the stage's own command runs; this module only orders
them, times them and writes the summary and the report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass
class ChainResult:
    cfg: Config
    timings: list[tuple[str, float, str]] = field(default_factory=list)  # (stage, seconds, status)
    manifest: dict | None = None
    pretrain: Any = None
    evaluation: Any = None
    report: str | None = None

    def describe(self) -> str:
        from shards.manifest import summary_table

        lines = ["", "== stages =="]
        width = max(len(s) for s, _, _ in self.timings)
        for stage, sec, status in self.timings:
            lines.append(f"  {stage:<{width}}  {sec:7.1f} s  {status}")
        lines.append(f"  {'total':<{width}}  {sum(t for _, t, _ in self.timings):7.1f} s")
        if self.manifest is not None:
            lines += ["", "== data ==", summary_table(self.manifest)]
        if self.pretrain is not None:
            lines += ["", "== pretraining ==", self.pretrain.describe()]
        if self.evaluation is not None:
            lines += ["", "== evaluation ==", self.evaluation.describe()]
        uri = self.cfg.tracking.uri
        lines += ["", "== next =="]
        if uri.startswith("sqlite"):
            lines.append(f"  MLflow:  mlflow ui --backend-store-uri {uri}")
        else:
            lines.append(f"  MLflow:  {uri}")
        if self.report:
            lines.append(f"  report:  {self.report}")
        return "\n".join(lines)


def _export_matches(cfg: Config, centers_url: str) -> bool:
    """A finished, registered export of this very config, trained on these data, exists."""
    from pipeline.paths import export_dir, run_name

    folder = export_dir(cfg)
    try:
        with open(os.path.join(folder, "spec.json")) as f:
            spec = json.load(f)
        return os.path.isfile(os.path.join(folder, "registered.json")) and \
            spec["provenance"].get("run_name") == run_name(cfg, centers_url)
    except (OSError, KeyError, ValueError):
        return False


def run_chain(cfg: Config) -> ChainResult:
    from pipeline.evaluate.jobs import evaluate
    from pipeline.launcher import pretrain
    from pipeline.report import write_report
    from pipeline.stages import Context, centers, refbank, shards as shards_stage, synth

    result = ChainResult(cfg)
    stages: list[tuple[str, Callable[[], str]]] = []

    def stage(name: str):
        def deco(fn: Callable[[], str]) -> Callable[[], str]:
            stages.append((name, fn))
            return fn
        return deco

    made: dict = {}  # what later stages take from earlier ones: the backbone, the centers' URL

    @stage("data")
    def _data() -> str:
        return synth.summary(synth.run(cfg, Context(progress=True)))

    @stage("shards")
    def _shards() -> str:
        result.manifest = shards_stage.run(cfg, Context(progress=True))
        return shards_stage.summary(result.manifest)

    @stage("refbank")
    def _refbank() -> str:
        made["ctx"] = Context(progress=True)
        return refbank.run(cfg, made["ctx"])

    @stage("centers")
    def _centers() -> str:
        made["centers"] = centers.run(cfg, made["ctx"])
        return made["centers"]

    @stage("pretrain")
    def _pretrain() -> str:
        if _export_matches(cfg, made["centers"]):
            return "skipped (a registered export of this config exists)"
        result.pretrain = pretrain(cfg)
        return f"model version {result.pretrain.model_version}"

    @stage("evaluate")
    def _evaluate() -> str:
        result.evaluation = evaluate(cfg)
        sel = result.evaluation.selection
        return f"alias {sel['decision']}" if sel else "done"

    @stage("report")
    def _report() -> str:
        result.report = write_report(cfg, result)
        return result.report

    for i, (name, fn) in enumerate(stages, 1):
        log.info("== [%d/%d] %s ==", i, len(stages), name)
        t0 = time.perf_counter()
        status = fn()
        result.timings.append((name, time.perf_counter() - t0, status))
        log.info("== [%d/%d] %s: %s (%.1f s) ==", i, len(stages), name, status, result.timings[-1][1])
    return result
