"""bench/gpu.py: the smoke mode runs every row of the GPU benchmark's table on the CPU, and its
host→device byte counter counts what crosses to another device."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.py"
ROWS = ["bf16 matmul peak (512³)", "backbone bf16", "evaluation features", "training step",
        "backbone + channels_last", "backbone + torch.compile (eager)"]


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(stdout: str) -> list[list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_smoke_mode_prints_every_row_of_the_table():
    gpu = bench_module()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a machine with a GPU
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=1200,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    header, rule, body = rows[0], rows[1], rows[2:]
    assert header == gpu.COLUMNS
    assert len(rule) == len(header) and all(set(c) <= set("-:") for c in rule)
    col = {name: i for i, name in enumerate(header)}
    by_row = {r[col["row"]]: r for r in body}
    assert list(by_row) == ROWS, (proc.stdout, proc.stderr[-3000:])
    for r in body:
        assert len(r) == len(header) and r[col["weights"]] == "random"
        assert "failed" not in r[col["note"]], (r, proc.stderr[-3000:])

    def number(row: str, column: str) -> float:
        return float(by_row[row][col[column]].rstrip("%×"))

    assert number(ROWS[0], "TFLOP/s") > 0
    for row in ROWS[1:]:
        assert number(row, "images/s") > 0
    for row in ("backbone bf16", "backbone + channels_last", "backbone + torch.compile (eager)"):
        assert 0 < number(row, "MFU") and number(row, "TFLOP/s") > 0
    step = by_row["training step"]
    assert number("training step", "vs bound") > 0
    assert step[col["H→D MiB/step"]] == "0.0"  # the CPU is the device: nothing crosses
    assert "on the device" in step[col["note"]] and "K in [" in step[col["note"]]
    assert "weights random" in proc.stdout


def test_host_to_device_counter_counts_copies_to_another_device():
    gpu = bench_module()
    host = torch.ones(1000)  # 4000 bytes
    with gpu.HostToDevice() as counter:
        host.to("meta")
        host.clone().to(torch.float64)  # stays on the host: not counted
        torch.empty(10, dtype=torch.float16, device="meta").copy_(torch.ones(10, dtype=torch.float16))
        torch.empty(3, device="meta").to("meta")  # device to device: not counted
    assert counter.bytes == 4000 + 20
