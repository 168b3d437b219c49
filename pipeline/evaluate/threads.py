"""How many CPU threads an evaluation computation uses.

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
