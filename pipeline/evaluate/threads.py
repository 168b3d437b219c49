"""How an evaluation computation runs: its CPU threads and its random state.

Every computation on the CPU runs torch on one thread: Ray tasks and the in-process run then
give identical numbers, and the small memory-bound steps of PatchCore's coreset selection do
not pay for threads they cannot use. On a GPU nothing is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch CPU ops on one thread, restoring the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def computing_on(device: torch.device):
    """The context of a computation on ``device``: one thread on the CPU (identical numbers in
    Ray tasks and in-process), nothing to set on a GPU."""
    return one_thread() if device.type == "cpu" else contextlib.nullcontext()


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with torch's CPU generator (and ``device``'s, on a GPU) seeded by ``seed``, and
    restore their states afterwards, so a fit neither depends on nor changes global state."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
