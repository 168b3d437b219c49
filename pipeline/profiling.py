"""The training loop's phases under ``torch.profiler`` (``train.profile``, ``--profile``).

The loop marks its phases with :func:`phase` everywhere (a ``record_function`` range, which
costs next to nothing while no profiler records). With ``train.profile.enabled``, rank 0
records steps ``start .. start + steps - 1`` and writes, under ``{run folder}/profile/``:

- ``trace.json``: the Chrome/Perfetto trace of those steps;
- ``phases.md`` and ``phases.json``: milliseconds per step of each phase, its share of the
  step, and what the phases leave unexplained (``other``).

Rank 0 also logs the folder and ``profile/<phase>_ms`` metrics to the training's MLflow run.
The phases are host wall time of each range (on CUDA, work queued by a range may finish
later: read the trace's device rows next to them).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

PREFIX = "adp::"
STEP = "step"
PHASES = ("data wait", "bank draw", "backbone", "matching", "projector forward", "losses", "backward",
          "optimizer step", "collectives", "logging")


def phase(name: str):
    """A profiler range named ``adp::<name>`` (``name`` one of :data:`PHASES` or :data:`STEP`)."""
    return torch.profiler.record_function(PREFIX + name)


class LoopProfiler:
    """Records ``steps`` optimizer steps after ``start`` and writes the trace and the phase table.

    ``step()`` after every optimizer step; ``close()`` at the end of the loop (writes the files
    if the window was reached; returns their folder or None).
    """

    def __init__(self, start: int, steps: int, folder: str, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        self.folder, self.steps, self.written = folder, steps, False
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        # the step before the window warms the profiler up, so the window starts at step ``start``
        when = schedule(wait=max(start - 1, 0), warmup=min(start, 1), active=steps, repeat=1)
        self.prof = profile(activities=activities, schedule=when, on_trace_ready=self._write)
        self.prof.__enter__()

    def step(self) -> None:
        self.prof.step()

    def close(self) -> str | None:
        self.prof.__exit__(None, None, None)
        return self.folder if self.written else None

    def _write(self, prof) -> None:
        os.makedirs(self.folder, exist_ok=True)
        prof.export_chrome_trace(os.path.join(self.folder, "trace.json"))
        table = phase_table({e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()
                             if e.key.startswith(PREFIX)}, self.steps)
        with open(os.path.join(self.folder, "phases.json"), "w") as f:
            json.dump(table, f, indent=1)
        with open(os.path.join(self.folder, "phases.md"), "w") as f:
            f.write(phase_markdown(table))
        self.written = True
        log.info("profile of %d steps written to %s\n%s", self.steps, self.folder, phase_markdown(table))


def phase_table(totals_ms: dict[str, float], steps: int) -> dict[str, Any]:
    """Range totals (``adp::<name>`` -> ms over the window) -> ms per step of each phase, its
    share of the step, and ``other`` = step - the phases inside it."""
    per = {name: totals_ms.get(PREFIX + name, 0.0) / steps for name in (STEP, *PHASES)}
    step_ms = per.pop(STEP)
    inside = sum(v for k, v in per.items() if k not in ("collectives", "logging"))
    rows = [{"phase": k, "ms_per_step": v, "share": v / step_ms if step_ms else None} for k, v in per.items()]
    other = max(step_ms - inside, 0.0)
    rows.append({"phase": "other", "ms_per_step": other, "share": other / step_ms if step_ms else None})
    return {"steps": steps, "step_ms": step_ms, "phases": rows}


def phase_markdown(table: dict[str, Any]) -> str:
    lines = [f"{table['steps']} steps, {table['step_ms']:.1f} ms per optimizer step, data wait included (collectives "
             "and logging run at logging steps, outside the step)", "", "| phase | ms / step | share of the step |",
             "| --- | ---: | ---: |"]
    for r in table["phases"]:
        share = "n/a" if r["share"] is None else f"{100 * r['share']:.1f} %"
        lines.append(f"| {r['phase']} | {r['ms_per_step']:.2f} | {share} |")
    return "\n".join(lines) + "\n"


def loop_profiler(spec, rank: int, folder: str, device: torch.device) -> LoopProfiler | None:
    """Rank 0's profiler when ``train.profile`` asks for one, else None."""
    if not spec.enabled or rank != 0:
        return None
    return LoopProfiler(spec.start, spec.steps, folder, device)


