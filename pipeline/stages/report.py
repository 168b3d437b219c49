"""The report stage, the last of the chain, and the chain's record.

:class:`ChainResult` is what `adpretrain run` did, read from the chain's :class:`Context`:
how each stage ended, the shard manifest, the pretraining and evaluation results, the
validation curve, the report's path. The stage writes the HTML report of it (:func:`pipeline.report.write_report`);
``adpretrain run`` prints :meth:`ChainResult.describe`.

It has no ``done``: the report shows this invocation (its stage timings and evaluation), so
it is written anew every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.stages import Context

NAME = "report"


@dataclass
class ChainResult:
    """What the chain did so far, by the NAME of the stage that wrote it."""

    cfg: Config
    ctx: Context

    @property
    def timings(self) -> list[tuple[str, float, str]]:  # (stage, seconds, status)
        return self.ctx.timings

    @property
    def manifest(self) -> dict | None:
        return self.ctx.outputs.get("shards")

    @property
    def pretrain(self) -> Any:
        return self.ctx.outputs.get("pretrain")

    @property
    def evaluation(self) -> Any:
        return self.ctx.outputs.get("evaluate")

    @property
    def curve(self) -> Any:
        return self.ctx.outputs.get("curve")

    @property
    def report(self) -> str | None:
        return self.ctx.outputs.get(NAME)

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
        if self.curve is not None:
            lines += ["", "== validation curve ==", self.curve.describe()]
        uri = self.cfg.tracking.uri
        lines += ["", "== next =="]
        if uri.startswith("sqlite"):
            lines.append(f"  MLflow:  mlflow ui --backend-store-uri {uri}")
        else:
            lines.append(f"  MLflow:  {uri}")
        if self.report:
            lines.append(f"  report:  {self.report}")
        return "\n".join(lines)


def run(cfg: Config, ctx: Context) -> str:
    """Write the report of the chain so far; returns the path of ``report.html``."""
    from pipeline.report import write_report

    return write_report(cfg, ChainResult(cfg, ctx))


def summary(path: str) -> str:
    return path
