"""The pretraining driver: stages it needs, Ray Train fit, export, MLflow registration.

Used by ``adpretrain pretrain`` and by ``launch/pretrain.py`` (``ray job submit``). It joins
the running Ray cluster when there is one (RAY_ADDRESS / ray.address), else starts a local one.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.paths import export_dir, profile_dir, refbank_url, run_name, train_storage
from pipeline.stages import Context
from shards import storage
from shards.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    run_id: str
    export_dir: str
    model_name: str
    model_version: str
    checkpoint: str
    steps: int
    metrics: dict = field(default_factory=dict)
    tracking_uri: str = ""

    def describe(self) -> str:
        loss = self.metrics.get("loss")
        return "\n".join([
            f"pretraining finished: {self.steps} steps" + (f", final loss {loss:.4f}" if loss is not None else ""),
            f"  checkpoint      {self.checkpoint}",
            f"  exported model  {self.export_dir}",
            f"  MLflow run      {self.run_id} ({storage.mask_secrets(self.tracking_uri)})",
            f"  registered      models:/{self.model_name}/{self.model_version}",
        ])


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _checkpoint_uri(path: str, storage_path: str) -> str:
    """Ray reports a checkpoint on an object store without its scheme: give it back."""
    scheme = storage_path.split("://", 1)[0] if storage.is_remote(storage_path) else ""
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def _check_gpus(cfg: Config) -> None:
    """Before any work: a local Ray needs CUDA on this machine; a cluster needs a GPU per worker
    (its driver may run on a node without one)."""
    import ray

    import torch

    from pipeline.devices import require_cuda
    from pipeline.rayctx import cluster_address, init_ray

    if not cluster_address(cfg.ray):
        require_cuda(True, "train.use_gpu")
        if torch.cuda.device_count() < cfg.train.num_workers:
            raise UserError(f"train.use_gpu with train.num_workers={cfg.train.num_workers} needs that many GPUs, "
                            f"but this machine has {torch.cuda.device_count()}; lower train.num_workers")
        return
    init_ray(cfg.ray)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < cfg.train.num_workers:
        raise UserError(f"train.use_gpu with train.num_workers={cfg.train.num_workers} needs that many GPUs, but the "
                        f"Ray cluster has {gpus:g}; add GPU nodes or lower train.num_workers")


def pretrain(cfg: Config, ctx: Context | None = None) -> PretrainResult:
    """Train the projector on Ray Train, export it to :func:`pipeline.paths.export_dir` and
    register it in MLflow. The centers (and the reference bank before them) are computed first
    when missing; ``ctx`` shares the backbone with the stages before (default: a context of its own)."""
    from pipeline.tracking import RunTracker

    prep = _prepare(cfg, ctx or Context(progress=True))
    tracker = RunTracker.start(cfg.tracking, cfg, run_name=prep.run_name, tags=prep.tags)
    trainer = _trainer(cfg, prep, tracker.run_id)
    try:
        result = trainer.fit()
    except Exception as e:
        tracker.end("FAILED")
        raise UserError(storage.mask_secrets(f"pretraining run {cfg.name!r} failed: {e}")) from e
    if result.checkpoint is None:
        tracker.end("FAILED")
        raise UserError(f"pretraining run {cfg.name!r} produced no checkpoint")
    return _export_and_register(cfg, prep, tracker, result)


@dataclass
class _Prepared:
    """What the fit starts from: the backbone, the centers and the run's name and tags."""

    backbone: Any
    centers_url: str
    centers: list  # per level, as the export keeps them
    run_name: str
    tags: dict[str, str]


def _prepare(cfg: Config, ctx: Context) -> _Prepared:
    """Before any training: the GPUs, the tracking store and the run storage are checked, and the
    stages pretraining needs are run (the centers, and the reference bank first if missing)."""
    from pipeline.centers import load_centers
    from pipeline.stages import centers as centers_stage
    from pipeline.tracking import ensure_store
    from shards.manifest import manifest_sha256

    if cfg.train.use_gpu:
        _check_gpus(cfg)
    ensure_store(cfg.tracking)
    storage.check_writable(train_storage(cfg))
    manifest_sha = manifest_sha256(cfg.shards.url)  # a clear error when the shards are missing
    backbone = ctx.backbone(cfg.backbone)
    centers_at = centers_stage.run(cfg, ctx)  # builds the reference bank first if missing
    centers, _ = load_centers(centers_at)
    tags = {
        "git_commit": _git_commit(),
        "data.manifest_sha256": manifest_sha,
        "backbone.id": backbone.id,
        "backbone.weights": backbone.weights_desc,
        "backbone.weights_sha256": backbone.weights_sha256 or "none",
        "world_size": str(cfg.train.num_workers),
    }
    if backbone.random_weights:
        tags["warning"] = "RANDOM WEIGHTS: the backbone is not pretrained"
    return _Prepared(backbone, centers_at, centers, run_name(cfg, centers_at), tags)


def _trainer(cfg: Config, prep: _Prepared, run_id: str):
    """The Ray Train trainer of :func:`pipeline.train.train_loop` on the cluster :mod:`pipeline.rayctx` joins."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.rayctx import init_ray
    from pipeline.train import train_loop

    init_ray(cfg.ray)
    storage_path = train_storage(cfg)
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "run_id": run_id,
                           "storage_uri": storage.join(storage_path, prep.run_name),
                           "refbank_url": refbank_url(cfg, prep.backbone.id), "centers_url": prep.centers_url,
                           "profile_dir": profile_dir(cfg)},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
            placement_strategy=cfg.train.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=prep.run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _export_and_register(cfg: Config, prep: _Prepared, tracker, result) -> PretrainResult:
    """Export the last checkpoint's projector with the centers, register it as a new model
    version (recorded in ``registered.json`` of the export) and end the MLflow run."""
    from safetensors.torch import load_file

    from pipeline.export import PROJECTOR_FILE, REGISTERED_FILE, save_export

    folder = export_dir(cfg)
    with result.checkpoint.as_directory() as d:
        state = load_file(os.path.join(d, PROJECTOR_FILE))
    checkpoint = _checkpoint_uri(result.checkpoint.path, train_storage(cfg))
    provenance = {"run_id": tracker.run_id, "run_name": prep.run_name, "checkpoint": checkpoint,
                  "train_digest": cfg.train_digest(), **prep.tags}
    save_export(folder, state, prep.centers, prep.backbone, cfg.backbone, cfg.projector, provenance)
    version = tracker.log_model(folder, cfg.tracking.model_name,
                                tags={"run_id": tracker.run_id, "data.manifest_sha256": prep.tags["data.manifest_sha256"]})
    with open(os.path.join(folder, REGISTERED_FILE), "w") as f:
        json.dump({"name": cfg.tracking.model_name, "version": str(version), "tracking_uri": storage.mask_secrets(tracker.uri)}, f)
    tracker.end("FINISHED")
    return PretrainResult(
        run_id=tracker.run_id,
        export_dir=folder,
        model_name=cfg.tracking.model_name,
        model_version=str(version),
        checkpoint=checkpoint,
        steps=int(result.metrics.get("step", cfg.train.steps)) if result.metrics else cfg.train.steps,
        metrics=dict(result.metrics or {}),
        tracking_uri=cfg.tracking.uri,
    )
