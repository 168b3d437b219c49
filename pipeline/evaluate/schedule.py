"""Where the evaluation computes: in-process, or as Ray tasks.

With Ray, each source's shards are decoded once by CPU tasks of their own, then one item of
work per class: its features task (one per class, features shared through the object store)
and one task per (method, kind) cell, fanned out by :func:`pipeline.fanout.fan_out`. In
process, the same functions run one after the other. Every task on the CPU computes with
one thread, so both give identical numbers.

Devices (``eval.device``): on CUDA the feature and method tasks run on a GPU, each Ray task
asking for ``eval.gpus_per_task`` of one and taking the device Ray gave it
(:func:`pipeline.devices.task_device`); the shard decoding stays on the CPU.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from pipeline import devices
from pipeline.config import Config, EvalSpec
from pipeline.evaluate.cells import Cell, run_cell
from pipeline.evaluate.features import ClassInfo, ExportBlob, class_features
from pipeline.evaluate.plan import ClassPlan, ShardImages, Work, decode_shard
from pipeline.hostmem import retain_freed_memory
from shards.errors import UserError

log = logging.getLogger(__name__)


def run_sequential(cfg: Config, blob: ExportBlob, work: Work, size: int,
                   progress: bool) -> tuple[list[ClassInfo], list[Cell]]:
    """Every class's features and cells in this process, on ``eval.device``."""
    from tqdm import tqdm

    device = devices.resolve(cfg.eval.device)
    log.info("evaluation in-process on %s", device)
    infos, cells = [], []
    kinds, methods = list(cfg.eval.kinds), list(cfg.eval.methods)
    total = sum(len(p) for _, _, p in work) * len(kinds) * len(methods)
    with tqdm(total=total, desc="evaluate", unit="job", disable=not progress) as bar:
        for _, shards_of, plans in work:
            shards = [decode_shard(u, n, size) for u, n in shards_of]
            for plan in plans:
                *per_kind, info = class_features(blob, plan, kinds, device, *shards)
                infos.append(info)
                for kind, feats in zip(kinds, per_kind):
                    for method in methods:
                        cells.append(run_cell(method, kind, cfg.eval, feats, info, device))
                        bar.update()
    return infos, cells


def task_resources(spec: EvalSpec, cluster_gpus: float) -> tuple[bool, dict[str, float]]:
    """Whether the feature and method tasks run on GPUs, and the Ray resources each one asks
    for; ``cluster_gpus``: the GPUs of the Ray cluster (``auto`` uses them when there are any)."""
    use_gpu = spec.device == "cuda" or (spec.device == "auto" and cluster_gpus > 0)
    if use_gpu and cluster_gpus <= 0:
        raise UserError("eval.device is cuda but the Ray cluster has no GPU: start its nodes with GPUs "
                        "(`ray start --num-gpus N`) or set eval.device: cpu")
    return use_gpu, {"num_cpus": 1, "num_gpus": spec.gpus_per_task if use_gpu else 0}


def features_task(use_gpu: bool, blob: ExportBlob, plan: ClassPlan, kinds: Sequence[str],
                  *shards: ShardImages) -> tuple:
    """:func:`class_features` in a Ray task, on the device Ray gave it."""
    retain_freed_memory()
    return class_features(blob, plan, kinds, devices.task_device(use_gpu), *shards)


def cell_task(use_gpu: bool, method: str, kind: str, spec: EvalSpec,
              feats: tuple[list[torch.Tensor], list[torch.Tensor]], info: ClassInfo) -> Cell:
    """:func:`run_cell` in a Ray task, on the device Ray gave it."""
    retain_freed_memory()
    return run_cell(method, kind, spec, feats, info, devices.task_device(use_gpu))


def run_ray(cfg: Config, blob: ExportBlob, work: Work, size: int,
            progress: bool) -> tuple[list[ClassInfo], list[Cell]]:
    """One item of work per class: its features task and its cells, each source's shards
    decoded once by tasks of their own; at most one class per task slot in flight."""
    import ray

    from pipeline.fanout import fan_out
    from pipeline.rayctx import init_ray

    init_ray(cfg.ray)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu, resources = task_resources(cfg.eval, gpus)
    log.info("evaluation tasks on %s (each asks Ray for %s)", "GPUs" if use_gpu else "CPUs", resources)
    kinds, methods = list(cfg.eval.kinds), list(cfg.eval.methods)
    decode = ray.remote(num_cpus=1)(decode_shard)
    features = ray.remote(num_returns=len(kinds) + 1, **resources)(features_task)
    cell = ray.remote(**resources)(cell_task)
    blob_ref, spec_ref = ray.put(blob), ray.put(cfg.eval)
    decoded: dict[str, list] = {}  # source -> refs of its decoded shards, submitted with its first class

    def submit(item: tuple[str, list[tuple[str, int]], ClassPlan]) -> list:
        source, shards_of, plan = item
        if source not in decoded:
            decoded[source] = [decode.remote(u, n, size) for u, n in shards_of]
        *kind_refs, info_ref = features.remote(use_gpu, blob_ref, plan, kinds, *decoded[source])
        return [info_ref] + [cell.remote(use_gpu, method, kind, spec_ref, kref, info_ref)
                             for kind, kref in zip(kinds, kind_refs) for method in methods]

    items = [(src.name, shards_of, plan) for src, shards_of, plans in work for plan in plans]
    slots = gpus if use_gpu else ray.cluster_resources().get("CPU", 1)
    done = fan_out(items, submit, limit=int(slots), desc="evaluate", unit="job",
                   weight=lambda _: len(kinds) * len(methods), progress=progress)
    return [d[0] for d in done], [c for d in done for c in d[1:]]
