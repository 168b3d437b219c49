"""The Ray Train worker loop: frozen backbone -> residuals against the reference bank ->
projector (a DeepSpeed engine) -> angle + norm losses with negatives from all ranks.

Every rank runs the same number of steps on endless resampled streams, draws the same K
per step from a seeded RNG, and reports to Ray Train at the same steps, so no collective
can wait on a rank that stopped. Checkpoints hold each rank's DeepSpeed shard plus the
projector weights (safetensors) and the step; a restarted run resumes from the last one.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import Config, validate

log = logging.getLogger(__name__)

CKPT_TAG = "engine"
PROJECTOR_FILE = "projector.safetensors"


def lr_factor(step: int, cfg: Config, world_size: int) -> float:
    """Learning-rate multiplier at ``step``: global-batch scaling, linear warm-up, step decay."""
    t = cfg.train
    global_batch = cfg.data.batch_size * world_size
    scale = {"none": 1.0, "linear": global_batch / t.base_batch, "sqrt": math.sqrt(global_batch / t.base_batch)}
    f = scale[t.lr_scaling]
    if t.warmup_steps and step < t.warmup_steps:
        f *= (step + 1) / t.warmup_steps
    return f * 0.1 ** sum(step >= round(d * t.steps) for d in t.decay_at)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    d = cfg.train.deepspeed
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "train_batch_size": cfg.data.batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": d.grad_clip,
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.precision == "bf16":
        # autocast with fp32 master weights (METHOD.md §5), not a bf16 cast of the model
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif d.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if d.optimizer == "lamb":
        ds["optimizer"] = {"type": "Lamb", "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}}
    return ds


def choose_k(cfg: Config, step: int) -> int:
    """K references for ``step``: the same on every rank and after any restart."""
    rng = np.random.default_rng([cfg.seed, 0x4B, step])
    return int(rng.choice(cfg.data.k_choices))


def draw_banks(store, groups: list[str], keys: list[str], k: int, gen: torch.Generator, device) -> list[torch.Tensor]:
    """Per level a (B, k*h*w, C) bank: k reference images of each sample's group, never the sample itself."""
    per_sample = [store.draw(g, k, gen, exclude=key) for g, key in zip(groups, keys)]
    return [torch.stack([s[lvl] for s in per_sample]).to(device) for lvl in range(len(per_sample[0]))]


class Step:
    """One training step's math, shared by the worker loop and the benchmark."""

    def __init__(self, cfg: Config, backbone, store, centers: list[torch.Tensor], group=None):
        self.cfg, self.backbone, self.store, self.group = cfg, backbone, store, group
        self.centers = centers

    def residuals(self, batch: dict, k: int, gen: torch.Generator, device) -> tuple[list, list]:
        from pipeline.residual import match_residual

        banks = draw_banks(self.store, batch["group"], batch["key"], k, gen, device)
        chunk = self.cfg.refbank.match_chunk
        f1 = self.backbone(batch["view1"].to(device))
        f2 = self.backbone(batch["view2"].to(device))
        r1 = [match_residual(f, b, chunk) for f, b in zip(f1, banks)]
        r2 = [match_residual(f, b, chunk) for f, b in zip(f2, banks)]
        return r1, r2

    def loss(self, model, r1: list, r2: list, mask: torch.Tensor):
        from pipeline.losses import adpretrain_loss
        from pipeline.transforms import patch_labels

        b = r1[0].shape[0]
        out = model([torch.cat([a, c]) for a, c in zip(r1, r2)])
        e1, e2 = [o[:b] for o in out], [o[b:] for o in out]
        lc, grid = self.cfg.loss, self.backbone.grid
        angle = patch_labels(mask, grid, lc.angle_labels, lc.angle_pixel_threshold).to(e1[0].device)
        norm = patch_labels(mask, grid, lc.norm_labels, lc.angle_pixel_threshold).to(e1[0].device)
        n = len(e1)
        return adpretrain_loss(e1, e2, [angle] * n, [norm] * n, self.centers, lc.tau, lc.chunk_size, group=self.group)


def _all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(values, group=group)
    return values


def train_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker."""
    import deepspeed
    import ray.train
    from safetensors.torch import save_file

    from pipeline.backbone import build_backbone
    from pipeline.data import train_loader
    from pipeline.projector import Projector
    from pipeline.residual import RefBankStore, load_centers
    from pipeline.stages import centers_url, refbank_url
    from pipeline.tracking import RunTracker

    cfg = validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.use_gpu else torch.device("cpu")
    group = dist.group.WORLD if world > 1 else None
    torch.manual_seed(cfg.seed)

    backbone = build_backbone(cfg.backbone).to(device)
    store = RefBankStore(refbank_url(cfg, backbone.id), cfg.refbank.cache_groups)
    centers, _ = load_centers(centers_url(cfg, backbone.id))
    centers = [c.to(device) for c in centers]
    projector = Projector.from_spec(backbone.widths, cfg.projector)

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
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
        start = int(client["step"])
        log.info("rank %d resumed at step %d", rank, start)

    tracker = RunTracker.attach(cfg.tracking, loop_config["run_id"]) if rank == 0 and loop_config.get("run_id") else None
    if tracker is not None and start:
        tracker.log_metrics({"resumed_from_step": start}, step=start)
    step_math = Step(cfg, backbone, store, centers, group)
    loader = iter(train_loader(cfg, backbone.mean, backbone.std, backbone.grid, rank, restart=start))
    skipped = too_small = 0
    window = {"data": 0.0, "total": 0.0, "n": 0}
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t_data = time.perf_counter() - t0
        k = choose_k(cfg, step)
        gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, step, rank]).integers(2**62)))
        with torch.no_grad():
            r1, r2 = step_math.residuals(batch, k, gen, device)
        total, parts = step_math.loss(engine, r1, r2, batch["mask"])
        lr = scheduler.get_last_lr()[0]  # the rate this step applies
        engine.backward(total * world)  # the loss is this rank's share; DeepSpeed averages gradients
        engine.step()  # also steps the lr schedule
        t_step = time.perf_counter() - t0
        window["data"] += t_data
        window["total"] += t_step
        window["n"] += 1

        skipped += int(batch["skipped"])
        too_small += int(batch["too_small"])
        done = step + 1
        names = ["loss", *parts]
        vals = torch.stack([total.detach().float(), *[p.float() for p in parts.values()]]).cpu()
        vals = _all_reduce_sum(vals, group)
        metrics = {n: float(v) for n, v in zip(names, vals)}
        metrics.update(
            lr=lr,
            k=k,
            samples_per_s=cfg.data.batch_size * world * window["n"] / max(window["total"], 1e-9),
            data_wait_fraction=window["data"] / max(window["total"], 1e-9),
            skipped_samples=skipped,
            defects_too_small=too_small,
            step=done,
        )
        if tracker is not None and done % cfg.train.log_every == 0:
            tracker.log_metrics({k_: v for k_, v in metrics.items() if k_ != "step"}, step=done)
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            _checkpoint(engine, projector, metrics, done, tracker, loop_config.get("storage_uri", ""), save_file)
            window = {"data": 0.0, "total": 0.0, "n": 0}
    if tracker is not None:
        tracker.flush()


def _checkpoint(engine, projector, metrics: dict, step: int, tracker, storage_uri: str, save_file) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"step": step})
        proj_file = os.path.join(d, PROJECTOR_FILE)
        rank = ray.train.get_context().get_world_rank()
        if rank == 0:
            state = {k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()}
            save_file(state, proj_file)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        if tracker is not None:
            tracker.log_checkpoint(step, storage_uri, proj_file)
