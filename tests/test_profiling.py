"""The training profile: the recorded window, the files, the phase table's arithmetic, and the
config's check of the window. The real loop under Ray with ``train.profile`` is run by
tests/test_run_chain.py (the phases of the real step, the MLflow artifacts and metrics)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pipeline.config import ConfigError, load_config
import torch.distributed as dist

from pipeline.profiling import PHASES, STEP, LoopProfiler, op_markdown, phase, phase_markdown, phase_table

from test_selection import CI_CONFIG


def test_the_profiler_records_the_window_and_writes_the_trace_and_the_table(tmp_path):
    folder = tmp_path / "profile"
    prof = LoopProfiler(start=2, steps=3, folder=str(folder), device=torch.device("cpu"))
    x = torch.randn(64, 64)
    for _ in range(7):
        with phase(STEP):
            with phase("backbone"):
                y = x @ x
            with phase("losses"):
                y.square().sum()
        prof.step()
    assert prof.close() == str(folder)
    trace = json.loads((folder / "trace.json").read_text())
    names = [e.get("name") for e in trace["traceEvents"]]
    # exactly the three steps of the window, each with its phases
    assert names.count("adp::step") == 3 and names.count("adp::backbone") == 3 and names.count("adp::losses") == 3
    table = json.loads((folder / "phases.json").read_text())
    rows = {r["phase"]: r for r in table["phases"]}
    assert table["steps"] == 3 and list(rows) == [*PHASES, "other"]
    assert rows["backbone"]["ms_per_step"] > 0 and rows["losses"]["ms_per_step"] > 0
    assert rows["backward"]["ms_per_step"] == 0  # a phase the loop never entered
    assert (folder / "phases.md").read_text() == phase_markdown(table)


def test_the_operator_table_splits_each_phase_and_places_other_threads_by_time(tmp_path, gloo_world):
    folder = tmp_path / "profile"
    prof = LoopProfiler(start=1, steps=2, folder=str(folder), device=torch.device("cpu"))
    x = torch.randn(128, 128, requires_grad=True)
    for _ in range(4):
        with phase(STEP):
            with phase("backbone"):
                y = torch.mm(x, x)
            with phase("losses"):
                loss = y.tanh().sum()
                dist.all_reduce(torch.ones(1 << 16), group=gloo_world)  # gloo runs it on its own thread
            with phase("backward"):
                loss.backward()
        prof.step()
    prof.close()
    table = json.loads((folder / "ops.json").read_text())
    groups = {g["phase"]: g for g in table}
    assert [g["phase"] for g in table] == ["backbone", "losses", "losses (other threads)", "backward"]
    ops = {p: {r["op"]: r["ms_per_step"] for r in g["ops"]} for p, g in groups.items()}
    assert max(ops["backbone"], key=ops["backbone"].get) == "aten::mm"
    assert {"aten::tanh", "aten::sum", "c10d::allreduce_", "(rest)"} <= set(ops["losses"])
    assert "gloo:all_reduce" in ops["losses (other threads)"] and "(rest)" not in ops["losses (other threads)"]
    assert {"MmBackward0", "TanhBackward0"} <= set(ops["backward"])  # the autograd wrapper's name shortened
    for p in ("backbone", "losses", "backward"):  # the operators and the rest add up to the phase
        assert sum(ops[p].values()) == pytest.approx(groups[p]["ms_per_step"]) and all(v >= 0 for v in ops[p].values())
    assert (folder / "ops.md").read_text() == op_markdown(table)
    assert "| backbone (" in op_markdown(table) and "| aten::mm |" in op_markdown(table)


def test_a_window_never_reached_writes_nothing(tmp_path):
    prof = LoopProfiler(start=5, steps=3, folder=str(tmp_path / "p"), device=torch.device("cpu"))
    for _ in range(3):
        prof.step()
    assert prof.close() is None and not (tmp_path / "p").exists()


def test_the_phase_table_is_per_step_with_shares_and_what_is_left():
    totals = {"adp::step": 300.0, "adp::backbone": 120.0, "adp::losses": 60.0, "adp::data wait": 30.0,
              "adp::collectives": 15.0, "adp::other_name": 999.0}
    table = phase_table(totals, steps=3)
    rows = {r["phase"]: r for r in table["phases"]}
    assert table["step_ms"] == 100.0
    assert rows["backbone"]["ms_per_step"] == 40.0 and rows["backbone"]["share"] == pytest.approx(0.4)
    # collectives and logging are outside the step: not subtracted from it
    assert rows["other"]["ms_per_step"] == pytest.approx(100 - 40 - 20 - 10)
    assert rows["collectives"]["ms_per_step"] == 5.0
    assert "| backbone | 40.00 | 40.0 % |" in phase_markdown(table)


def test_a_window_beyond_the_run_is_a_config_error():
    raw = yaml.safe_load(CI_CONFIG.read_text())
    steps = raw["train"]["steps"]
    ok = load_config({**raw, "train": {**raw["train"], "profile": {"enabled": True, "start": 1, "steps": steps - 1}}})
    assert ok.train.profile.enabled
    with pytest.raises(ConfigError, match=f"train.profile records steps 2..{steps + 1}, beyond train.steps {steps}"):
        load_config({**raw, "train": {**raw["train"], "profile": {"enabled": True, "start": 1, "steps": steps}}})
