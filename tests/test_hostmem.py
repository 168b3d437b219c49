"""Freed host memory stays in the process (pipeline.hostmem), measured by the page faults that
reallocating a large tensor costs, in fresh processes so that nothing here sets it first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import hostmem

# allocates, fills and frees 48 MiB (above glibc's largest adaptive mmap threshold, 32 MiB) ten
# times after ten untimed rounds (the heap settles in a few), then the same in a forked child;
# prints the minor page faults of the ten timed rounds in each process
_PROBE = r"""
import json, os, resource, sys
import torch
from pipeline.hostmem import retain_freed_memory
torch.set_num_threads(1)  # as in the workers; OpenMP threads do not survive a fork
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
def faults():
    for _ in range(10):
        torch.empty(12 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(12 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
parent = faults()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, str(faults()).encode()); os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"applied": applied, "parent": parent, "child": int(os.read(r, 64))}))
"""

PAGES = 10 * (48 << 20) // 4096  # pages the ten rounds touch


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults_in_the_process_and_its_forks():
    default, retained = _probe("default"), _probe("retain")
    assert retained["applied"] is True, "this machine's glibc should take the malloc thresholds"
    # glibc's default hands each 48 MiB block back on free: every round faults its pages in again
    assert default["parent"] > PAGES // 2 and default["child"] > PAGES // 2, default
    assert retained["parent"] < PAGES // 100 and retained["child"] < PAGES // 100, retained


def test_without_glibc_nothing_is_set(monkeypatch):
    def not_gnu(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", not_gnu)
    monkeypatch.setattr(hostmem, "_applied", None)
    assert hostmem.retain_freed_memory() is False
    assert hostmem.retain_freed_memory() is False  # the first answer is kept


@pytest.mark.parametrize("entry", ["pipeline.train:train_loop", "pipeline.evaluate.schedule:features_task",
                                   "pipeline.evaluate.schedule:cell_task", "pipeline.stages.centers:_centers_task",
                                   "pipeline.cli:main"])
def test_every_process_entry_of_the_tensor_work_sets_it_first(entry):
    import importlib
    import inspect

    module, name = entry.split(":")
    src = inspect.getsource(getattr(importlib.import_module(module), name))
    assert "retain_freed_memory()" in src, f"{entry} does not call pipeline.hostmem.retain_freed_memory()"
