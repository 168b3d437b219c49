"""The training loop's phases under ``torch.profiler`` (``train.profile``, ``--profile``).

The loop marks its phases with :func:`phase` everywhere (a ``record_function`` range, which
costs next to nothing while no profiler records). With ``train.profile.enabled``, rank 0
records steps ``start .. start + steps - 1`` and writes, under ``{run folder}/profile/``:

- ``trace.json``: the Chrome/Perfetto trace of those steps;
- ``phases.md`` and ``phases.json``: milliseconds per step of each phase, its share of the
  step, and what the phases leave unexplained (``other``);
- ``ops.md`` and ``ops.json``: inside each phase, the operators called directly in it (with
  what they call), heaviest first, so what a phase spends its time on is read without
  opening the trace. Work on other threads (gloo's collectives, for one) is listed under the
  phase of the training thread that was running when it started, marked as other threads
  (it overlaps that phase's time instead of adding to it).

Rank 0 also logs the folder and ``profile/<phase>_ms`` metrics to the training's MLflow run.
The phases are host wall time of each range (on CUDA, work queued by a range may finish
later: read the trace's device rows next to them).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from typing import Any

import torch
from torch.autograd import DeviceType

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
        ops = op_table(prof.events(), self.steps)
        with open(os.path.join(self.folder, "ops.json"), "w") as f:
            json.dump(ops, f, indent=1)
        with open(os.path.join(self.folder, "ops.md"), "w") as f:
            f.write(op_markdown(ops))
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


OTHER_THREADS = " (other threads)"
_WRAPPER = "autograd::engine::evaluate_function: "


def op_table(events, steps: int, top: int = 8) -> list[dict[str, Any]]:
    """Per phase, the ``top`` heaviest operators called directly inside its range, in ms per step
    (host time including what they call; device time too where the profile has it).

    ``events`` are the profiler's (``prof.events()``). An event with no phase among its callers
    runs on another thread: it counts under the phase, on any thread, whose range holds its
    start, as ``<phase> (other threads)``. What is left of a phase's time is ``(rest)``: its
    own Python and the operators below the ``top``."""
    ranges = sorted((e for e in events if e.name.startswith(PREFIX) and e.name != PREFIX + STEP),
                    key=lambda e: e.time_range.start)
    starts = [r.time_range.start for r in ranges]
    totals: dict[str, dict[str, list[float]]] = {}
    for e in events:
        if e.name.startswith(PREFIX) or e.device_type != DeviceType.CPU:
            continue  # the phases themselves; device kernels count in the operator that launched them
        parent = e.cpu_parent
        if parent is None:  # on another thread
            i = bisect.bisect_right(starts, e.time_range.start) - 1
            if i < 0 or ranges[i].time_range.end < e.time_range.start:
                continue  # outside every phase
            group = ranges[i].name[len(PREFIX):] + OTHER_THREADS
        elif parent.name.startswith(PREFIX) and parent.name != PREFIX + STEP:
            group = parent.name[len(PREFIX):]
        else:
            continue  # counted in the operator that called it (or the step's own bookkeeping)
        row = totals.setdefault(group, {}).setdefault(e.name.removeprefix(_WRAPPER), [0.0, 0.0])
        row[0] += e.cpu_time_total / 1e3
        row[1] += e.device_time_total / 1e3
    phase_ms: dict[str, float] = {}
    for r in ranges:
        name = r.name[len(PREFIX):]
        phase_ms[name] = phase_ms.get(name, 0.0) + r.cpu_time_total / 1e3

    def order(group: str) -> tuple:
        base = group.removesuffix(OTHER_THREADS)
        return (PHASES.index(base) if base in PHASES else len(PHASES), base, group != base)

    out = []
    for group in sorted(totals.keys() | phase_ms.keys(), key=order):
        ops = sorted(totals.get(group, {}).items(), key=lambda kv: -kv[1][0])[:top]
        rows = [{"op": name, "ms_per_step": ms / steps, "device_ms_per_step": dev / steps} for name, (ms, dev) in ops]
        if group in phase_ms:
            rest = phase_ms[group] - sum(ms for _, (ms, _) in ops)
            rows.append({"op": "(rest)", "ms_per_step": max(rest, 0.0) / steps, "device_ms_per_step": 0.0})
        out.append({"phase": group, "ms_per_step": phase_ms.get(group, 0.0) / steps, "ops": rows})
    return out


def op_markdown(table: list[dict[str, Any]]) -> str:
    device = any(r["device_ms_per_step"] for g in table for r in g["ops"])
    head = "| phase | operator | ms / step |" + (" device ms / step |" if device else "")
    lines = ["Operators called directly in each phase, with what they call (host time; other threads overlap "
             "the phase they are listed under)", "", head, "| --- | --- | ---: |" + (" ---: |" if device else "")]
    for g in table:
        for j, r in enumerate(g["ops"]):
            name = (f"{g['phase']} ({g['ms_per_step']:.1f} ms)" if g["ms_per_step"] else g["phase"]) if j == 0 else ""
            lines.append(f"| {name} | {r['op']} | {r['ms_per_step']:.2f} |"
                         + (f" {r['device_ms_per_step']:.2f} |" if device else ""))
    return "\n".join(lines) + "\n"


def loop_profiler(spec, rank: int, folder: str, device: torch.device) -> LoopProfiler | None:
    """Rank 0's profiler when ``train.profile`` asks for one, else None."""
    if not spec.enabled or rank != 0:
        return None
    return LoopProfiler(spec.start, spec.steps, folder, device)


