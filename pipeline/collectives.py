"""Every collective of the training loop, in one place.

A collective runs on its process group's device: NCCL has no CPU path, so under NCCL every
tensor handed here must already live on the worker's CUDA device (a CPU tensor raises here,
with what and where, instead of failing or hanging inside NCCL); gloo takes CPU tensors.
Callers keep their tensors on the compute device, so nothing is copied to reach a collective.
``group=None`` is one process: every function is then the identity, with no collective.

- :func:`sum_`, :func:`min_`: in-place all-reduce of a detached tensor;
- :func:`gather_rows`: every rank's rows (with gradient back to their owners) and labels;
- :class:`MetricWindow`: the loop's metrics summed on the device step after step, reduced
  over ranks and read on the host once per window (``train.log_every`` steps), so reading
  metrics never makes a step wait for the device.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def check_device(t: Tensor, group: ProcessGroup, what: str) -> None:
    """Raise when ``t`` cannot take part in a collective of ``group``'s backend."""
    backend = dist.get_backend(group)
    if backend == "nccl" and t.device.type != "cuda":
        raise RuntimeError(f"{what}: a collective under NCCL got a tensor on {t.device}; "
                           "keep the tensor on the worker's CUDA device (pipeline.devices.train_device)")
    if backend == "gloo" and t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{what}: gloo cannot reduce a tensor on {t.device}")


def sum_(t: Tensor, group: ProcessGroup | None, what: str = "sum") -> Tensor:
    """In place: the sum of ``t`` over the ranks of ``group``."""
    if group is not None:
        check_device(t, group, what)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def min_(t: Tensor, group: ProcessGroup | None, what: str = "min") -> Tensor:
    """In place: the minimum of ``t`` over the ranks of ``group``."""
    if group is not None:
        check_device(t, group, what)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return t


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


def gather_rows(z: Tensor, labels: Tensor, group: ProcessGroup) -> tuple[Tensor, Tensor]:
    """Every rank's rows of ``z`` (N_r, C) and ``labels`` (N_r,) bool, in rank order; the
    gradient of a gathered row flows back to the rank that owns it. Ranks may hold
    different numbers of rows."""
    check_device(z, group, "gather_rows")
    size = torch.tensor([z.shape[0]], dtype=torch.int64, device=z.device)
    sizes_t = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes_t, size, group=group)
    sizes = [int(s) for s in sizes_t]
    m = max(sizes)
    parts = dist_nn.all_gather(_pad_rows(z, m), group=group)
    label_parts = [torch.zeros(m, dtype=torch.uint8, device=z.device) for _ in sizes]
    dist.all_gather(label_parts, _pad_rows(labels.to(torch.uint8), m), group=group)
    zg = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    yg = torch.cat([p[:s] for p, s in zip(label_parts, sizes)]).bool()
    return zg, yg


class MetricWindow:
    """Per-step scalar tensors summed on ``device``; :meth:`reduce` sums them over ranks
    and returns their per-step means as floats, with the window's throughput.

    Every rank calls ``add`` and ``reduce`` at the same steps (reduce is a collective).
    """

    def __init__(self, names: list[str], device: torch.device, group: ProcessGroup | None) -> None:
        self.names, self.device, self.group = list(names), device, group
        self._start()

    def _start(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float32, device=self.device)
        self.steps = 0
        self.data_s = 0.0
        self.t0 = time.perf_counter()

    def add(self, values: list[Tensor], data_s: float) -> None:
        """One step's detached scalars (in ``names`` order) and its host time waiting for data."""
        self.sums += torch.stack([v.detach().float() for v in values])
        self.steps += 1
        self.data_s += data_s

    def reduce(self, samples_per_step: int) -> dict[str, float]:
        """Means over the window of the rank sums, ``samples_per_s`` and
        ``data_wait_fraction``; starts the next window. One collective, one host sync."""
        sums = sum_(self.sums, self.group, "metrics")
        means = (sums / max(self.steps, 1)).tolist()  # the window's only host sync
        wall = max(time.perf_counter() - self.t0, 1e-9)
        out = dict(zip(self.names, means))
        out.update(samples_per_s=samples_per_step * self.steps / wall, data_wait_fraction=self.data_s / wall)
        self._start()
        return out
