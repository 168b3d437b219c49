"""The Ray Train worker loop: frozen backbone -> residuals against the reference bank ->
projector (a DeepSpeed engine) -> angle + norm losses with negatives from all ranks.

Every rank runs the same number of steps on endless resampled streams, draws the same K
per micro-batch from a seeded RNG, and reduces metrics and reports to Ray Train at the same
steps, so no collective can wait on a rank that stopped. Everything a step computes lives on
the device Ray Train gave the worker (:mod:`pipeline.devices`), the reference bank included
(:mod:`pipeline.bank`); every collective goes through :mod:`pipeline.collectives`.

With ``train.grad_accum`` = A, an optimizer step takes A micro-batches of ``data.batch_size``
per rank; the angle loss's negatives come from one micro-batch of every rank.

Checkpoints hold each rank's DeepSpeed shard plus the projector weights (safetensors) and
the step; a restarted run resumes from the last one. DeepSpeed's files are read back with
``torch.load(weights_only=True)`` only (:func:`read_checkpoints_safely`): a checkpoint that
holds anything but tensors and plain values is refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import Config, validate
from pipeline.devices import to_device
from shards.errors import UserError
from pipeline.export import PROJECTOR_FILE
from pipeline.hostmem import retain_freed_memory
from pipeline.profiling import STEP, loop_profiler, phase

log = logging.getLogger(__name__)

CKPT_TAG = "engine"


def lr_factor(step: int, cfg: Config, world_size: int) -> float:
    """Learning-rate multiplier at ``step``: global-batch scaling, linear warm-up, step decay."""
    t = cfg.train
    global_batch = cfg.data.batch_size * world_size * t.grad_accum
    scale = {"none": 1.0, "linear": global_batch / t.base_batch, "sqrt": math.sqrt(global_batch / t.base_batch)}
    f = scale[t.lr_scaling]
    if t.warmup_steps and step < t.warmup_steps:
        f *= (step + 1) / t.warmup_steps
    return f * 0.1 ** sum(step >= round(d * t.steps) for d in t.decay_at)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    d, accum = cfg.train.deepspeed, cfg.train.grad_accum
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "train_batch_size": cfg.data.batch_size * world_size * accum,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": d.grad_clip,
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.precision != "fp32":
        # autocast over fp32 master weights (METHOD.md §5), never a cast of the model; for fp16
        # DeepSpeed adds dynamic loss scaling (torch.amp.GradScaler) to the same path
        ds["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[d.precision]}
    if d.optimizer == "lamb":
        ds["optimizer"] = {"type": "Lamb", "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}}
    return ds


def choose_k(cfg: Config, draw: int) -> int:
    """K references for micro-batch ``draw``: the same on every rank and after any restart."""
    rng = np.random.default_rng([cfg.seed, 0x4B, draw])
    return int(rng.choice(cfg.data.k_choices))


def draw_generator(cfg: Config, draw: int, rank: int) -> torch.Generator:
    """The host generator that picks this rank's references for micro-batch ``draw``."""
    return torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, draw, rank]).integers(2**62)))


class Step:
    """One micro-batch's math, shared by the worker loop, the tests and the benchmarks.

    ``bank`` is a :class:`pipeline.bank.WorkerBank`; its device is where everything runs.
    """

    def __init__(self, cfg: Config, backbone, bank, centers: list[torch.Tensor], group=None):
        self.cfg, self.backbone, self.bank, self.group = cfg, backbone, bank, group
        self.device = bank.device
        self.centers = centers

    def residuals(self, batch: dict, k: int, gen: torch.Generator) -> tuple[list, list]:
        from pipeline.matching import match_residual

        with phase("bank draw"):
            banks = self.bank.draw(batch["group"], batch["key"], k, gen)
        chunk = self.cfg.refbank.match_chunk
        with phase("backbone"):
            f1 = self.backbone(to_device(batch["view1"], self.device))
            f2 = self.backbone(to_device(batch["view2"], self.device))
        with phase("matching"):
            r1 = [match_residual(f, b, chunk) for f, b in zip(f1, banks)]
            r2 = [match_residual(f, b, chunk) for f, b in zip(f2, banks)]
        return r1, r2

    def loss(self, model, r1: list, r2: list, mask: torch.Tensor):
        from pipeline.losses import adpretrain_loss
        from pipeline.transforms import patch_labels

        b = r1[0].shape[0]
        with phase("projector forward"):
            out = model([torch.cat([a, c]) for a, c in zip(r1, r2)])
        e1, e2 = [o[:b] for o in out], [o[b:] for o in out]
        lc, grid = self.cfg.loss, self.backbone.grid
        with phase("losses"):
            angle = to_device(patch_labels(mask, grid, lc.angle_labels, lc.angle_pixel_threshold), self.device)
            norm = to_device(patch_labels(mask, grid, lc.norm_labels, lc.angle_pixel_threshold), self.device)
            n = len(e1)
            return adpretrain_loss(e1, e2, [angle] * n, [norm] * n, self.centers, lc.tau, lc.chunk_size,
                                   group=self.group, angle_weight=lc.angle_weight, norm_weight=lc.norm_weight)

    def __call__(self, model, batch: dict, k: int, gen: torch.Generator):
        """(total, parts) of this rank's share for one micro-batch; the backbone and matching without grad."""
        with torch.no_grad():
            r1, r2 = self.residuals(batch, k, gen)
        return self.loss(model, r1, r2, batch["mask"])


def part_names(levels: int) -> list[str]:
    """The loss parts :func:`pipeline.losses.adpretrain_loss` returns, in its order."""
    return [f"{p}/l{i}" for i in range(levels) for p in ("angle", "norm1", "norm2")]


def read_checkpoints_safely(engine) -> None:
    """Make DeepSpeed's torch checkpoint engine read with ``weights_only=True`` only: a file
    that holds anything but tensors, containers and plain values (or the DeepSpeed classes
    allowed by name in :func:`_safe_globals`) is refused with a :class:`UserError`, never unpickled."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise UserError(f"unsupported DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                        "pretraining checkpoints use the default torch engine")
    engine.checkpoint_engine.load = _safe_load


def _safe_globals() -> list:
    """DeepSpeed's own plain-data classes that its ZeRO optimizer files name (checked per version in the tests)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safe_load(path: str, map_location=None):
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"refusing to unpickle checkpoint file {path!r}: it holds more than tensors and plain values "
            f"({first}). It was not written by this pipeline or was tampered with; delete that checkpoint "
            "(or the run's storage folder) to start the run afresh"
        ) from None


def _resume(engine) -> int:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
    if not client or "step" not in client:
        raise UserError(f"checkpoint {ckpt.path!r} holds no step: it was not written by this pipeline")
    return int(client["step"])


def build_engine(cfg: Config, projector: torch.nn.Module, world: int):
    """The projector as a DeepSpeed engine (+ its lr scheduler), with the safe checkpoint reader."""
    import deepspeed
    from deepspeed.runtime import torch_autocast

    # DeepSpeed keeps the autocast dtype of the first engine with autocast in module globals and
    # never clears them: a later engine of this process (tests, benchmarks) would inherit it
    torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None
    optimizer = None
    if cfg.train.deepspeed.optimizer == "adam":
        # torch Adam: L2 weight decay as in the method (DeepSpeed's "Adam" would run AdamW)
        optimizer = torch.optim.Adam(projector.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=projector,
        optimizer=optimizer,
        model_parameters=None if optimizer is not None else projector.parameters(),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, world)),
        config=deepspeed_config(cfg, world),
        dist_init_required=False,
    )
    read_checkpoints_safely(engine)
    return engine, scheduler


def train_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker: set up, resume, then the steps; every rank reduces,
    logs and checkpoints at the same steps."""
    from pipeline.collectives import MetricWindow
    from pipeline.data import train_loader

    retain_freed_memory()
    w = _setup(loop_config)
    cfg, steps = w.cfg, w.cfg.train.steps
    start = _resume(w.engine)
    if start:
        log.info("rank %d resumed at step %d", w.rank, start)
    tracker = _attach_tracker(w, loop_config.get("run_id"), start)
    loader = iter(train_loader(cfg, w.backbone.mean, w.backbone.std, w.backbone.grid, w.rank, restart=start,
                               pin_memory=w.device.type == "cuda"))
    window = MetricWindow(["loss", *part_names(len(w.backbone.widths))], w.device, w.group)
    counts = {"skipped_samples": 0, "defects_too_small": 0}
    profiler = loop_profiler(cfg.train.profile, w.rank, loop_config.get("profile_dir", ""), w.device)
    for step in range(start, steps):
        lr = w.scheduler.get_last_lr()[0]  # the rate this step applies
        with phase(STEP):
            k = _optimizer_step(w, loader, step, window, counts)
        done = step + 1
        if profiler is not None:
            profiler.step()
        checkpoint = done % cfg.train.checkpoint_every == 0 or done == steps
        if done % cfg.train.log_every and not checkpoint:
            continue
        metrics = _log(w, window, tracker, lr=lr, k=k, step=done, **counts)
        if checkpoint:
            _checkpoint(w, metrics, done, tracker, loop_config.get("storage_uri", ""))
    _close_profile(profiler, tracker)
    if tracker is not None:
        tracker.close()


def _close_profile(profiler, tracker) -> None:
    """Write the profile (rank 0) and log it with its per-phase metrics to the MLflow run."""
    folder = profiler.close() if profiler is not None else None
    if folder is None or tracker is None:
        return
    with open(os.path.join(folder, "phases.json")) as f:
        table = json.load(f)
    tracker.log_metrics({f"profile/{r['phase'].replace(' ', '_')}_ms": r["ms_per_step"] for r in table["phases"]}
                        | {"profile/step_ms": table["step_ms"]}, step=0)
    tracker.log_artifacts(folder, "profile")


@dataclass
class _Worker:
    """What a worker sets up once: its place in the world and what the step runs on."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    group: Any  # the process group of the collectives; None for one worker
    backbone: Any
    projector: torch.nn.Module
    engine: Any  # the projector as a DeepSpeed engine
    scheduler: Any
    step_math: Step


def _setup(loop_config: dict) -> _Worker:
    """The worker's device, backbone, the driver's bank and centers, and the projector's engine."""
    import ray
    import ray.train

    from pipeline.backbone import build_backbone
    from pipeline.bank import WorkerBank
    from pipeline.centers import load_centers
    from pipeline.devices import train_device
    from pipeline.projector import Projector
    from pipeline.refbank import RefBankStore

    cfg = validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = train_device(cfg.train.use_gpu)
    group = dist.group.WORLD if world > 1 else None
    log.info("worker rank=%d world=%d node=%s device=%s", rank, world, ray.get_runtime_context().get_node_id(), device)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone).to(device)
    # the driver's bank and centers: a restarted worker keeps them even if the shards change meanwhile
    bank = WorkerBank(RefBankStore(loop_config["refbank_url"], cache_groups=1), device, cfg.train.bank_memory_fraction)
    centers = [c.to(device) for c in load_centers(loop_config["centers_url"], backbone.id)[0]]
    projector = Projector.from_spec(backbone.widths, cfg.projector).to(device)
    engine, scheduler = build_engine(cfg, projector, world)
    return _Worker(cfg, rank, world, device, group, backbone, projector, engine, scheduler,
                   Step(cfg, backbone, bank, centers, group))


def _attach_tracker(w: _Worker, run_id: str | None, start: int):
    """Rank 0's handle on the driver's MLflow run (None on the other ranks or without a run)."""
    from pipeline.tracking import RunTracker

    if w.rank != 0 or not run_id:
        return None
    tracker = RunTracker.attach(w.cfg.tracking, run_id)
    if start:
        tracker.log_metrics({"resumed_from_step": start}, step=start)
    return tracker


def _timed_next(loader) -> tuple[dict, float]:
    """The next batch and the seconds the step waited for it."""
    t0 = time.perf_counter()
    with phase("data wait"):
        batch = next(loader)
    return batch, time.perf_counter() - t0


def _optimizer_step(w: _Worker, loader, step: int, window, counts: dict[str, int]) -> int:
    """One optimizer step of ``train.grad_accum`` micro-batches, each added to ``window`` and
    ``counts``; returns the K of the last one."""
    accum = w.cfg.train.grad_accum
    for micro in range(accum):
        draw = step * accum + micro
        batch, data_s = _timed_next(loader)
        k = choose_k(w.cfg, draw)
        total, parts = w.step_math(w.engine, batch, k, draw_generator(w.cfg, draw, w.rank))
        with phase("backward"):
            w.engine.backward(total * w.world)  # the loss is this rank's share; DeepSpeed averages gradients
        with phase("optimizer step"):
            w.engine.step()  # applies the update (and the lr schedule) after the last micro-batch
        window.add([total, *parts.values()], data_s)
        counts["skipped_samples"] += int(batch["skipped"])
        counts["defects_too_small"] += int(batch["too_small"])
    return k


def _log(w: _Worker, window, tracker, **values) -> dict:
    """The window's metrics reduced over ranks (a collective: every rank calls it) with ``values``;
    rank 0 logs them at ``values["step"]``."""
    with phase("collectives"):
        metrics = window.reduce(w.cfg.data.batch_size * w.world)
    metrics.update(values)
    if tracker is not None:
        with phase("logging"):
            tracker.log_metrics({n: v for n, v in metrics.items() if n != "step"}, step=values["step"])
    return metrics


def _checkpoint(w: _Worker, metrics: dict, step: int, tracker, storage_uri: str) -> None:
    """Every rank's DeepSpeed shard and the step; rank 0 adds the projector weights (safetensors),
    which the tracker records. Reported to Ray Train with ``metrics``."""
    import ray.train
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        w.engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": step})
        proj_file = os.path.join(d, PROJECTOR_FILE)
        if w.rank == 0:
            state = w.projector.state_dict()
            save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, proj_file)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        if tracker is not None:
            tracker.log_checkpoint(step, storage_uri, proj_file)
