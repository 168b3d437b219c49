"""Where tensors live. The device always comes from the framework that placed the process:

- a Ray Train worker: :func:`train_device` (``ray.train.torch.get_device()``, the GPU Ray Train
  assigned to this worker's local rank), made the current CUDA device as well;
- a Ray task or actor that asked for GPUs: :func:`task_device` (the first GPU of
  ``ray.get_gpu_ids()``, found among the devices Ray left visible);
- a process of its own (the CLI, a notebook): :func:`resolve` of ``auto|cpu|cuda``.

Nothing else in the project chooses a CUDA index.
"""

from __future__ import annotations

import os

import torch

from shards.errors import UserError

CPU = torch.device("cpu")


def require_cuda(wanted: bool, key: str) -> None:
    """A clear error, before any work starts, when ``key`` asks for a GPU this machine lacks."""
    if wanted and not torch.cuda.is_available():
        raise UserError(f"{key} asks for a CUDA GPU but this machine has none (torch.cuda.is_available() is "
                        f"False); set {key} to use the CPU, or run on a GPU node")


def resolve(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda`` (the current CUDA device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return CPU
    require_cuda(True, f"device {name!r}")
    return torch.device("cuda", torch.cuda.current_device())


def train_device(use_gpu: bool) -> torch.device:
    """This Ray Train worker's device; CUDA workers also make it the current device."""
    if not use_gpu:
        return CPU
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type != "cuda":
        raise UserError(f"train.use_gpu is true but Ray Train gave this worker {device}; "
                        "start the Ray nodes with GPUs (`ray start --num-gpus N`)")
    torch.cuda.set_device(device)
    return device


def task_device(use_gpu: bool) -> torch.device:
    """The device of a Ray task or actor: the first GPU Ray assigned to it, else the CPU."""
    if not use_gpu:
        return CPU
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        raise UserError("this Ray task was asked to run on a GPU but Ray assigned it none; "
                        "request GPUs for it (num_gpus) or run it on the CPU")
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    index = visible.index(ids[0]) if ids[0] in visible else int(ids[0])
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: through pinned memory with a non-blocking copy for a GPU
    (the step does not wait for it), the tensor itself for the CPU."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
