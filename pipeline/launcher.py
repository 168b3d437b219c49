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

from pipeline.config import Config
from shards.errors import UserError
from pipeline.paths import export_dir, run_name, train_storage
from shards import storage

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


def pretrain(cfg: Config, parent_run_id: str | None = None) -> PretrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from safetensors.torch import load_file

    from pipeline.export import PROJECTOR_FILE, save_export
    from pipeline.rayctx import init_ray
    from pipeline.centers import load_centers
    from pipeline.stages import Context
    from pipeline.stages import centers as centers_stage
    from pipeline.paths import refbank_url
    from shards.manifest import manifest_sha256
    from pipeline.tracking import RunTracker, ensure_store
    from pipeline.train import train_loop

    if cfg.train.use_gpu:
        _check_gpus(cfg)
    ensure_store(cfg.tracking)
    storage.check_writable(train_storage(cfg))
    manifest_sha = manifest_sha256(cfg.shards.url)  # a clear error when the shards are missing

    ctx = Context(progress=True)
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
    ray_run = run_name(cfg, centers_at)
    tracker = RunTracker.start(cfg.tracking, cfg, run_name=ray_run, tags=tags, parent_run_id=parent_run_id)

    init_ray(cfg.ray)
    storage_path = train_storage(cfg)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "run_id": tracker.run_id,
                           "storage_uri": storage.join(storage_path, ray_run),
                           "refbank_url": refbank_url(cfg, backbone.id), "centers_url": centers_at},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
            placement_strategy=cfg.train.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=ray_run,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        tracker.end("FAILED")
        raise UserError(storage.mask_secrets(f"pretraining run {cfg.name!r} failed: {e}")) from e
    if result.checkpoint is None:
        tracker.end("FAILED")
        raise UserError(f"pretraining run {cfg.name!r} produced no checkpoint")

    folder = export_dir(cfg)
    with result.checkpoint.as_directory() as d:
        state = load_file(os.path.join(d, PROJECTOR_FILE))
    checkpoint = _checkpoint_uri(result.checkpoint.path, storage_path)
    provenance = {"run_id": tracker.run_id, "run_name": ray_run, "checkpoint": checkpoint,
                  "train_digest": cfg.train_digest(), **tags}
    save_export(folder, state, centers, backbone, cfg.backbone, cfg.projector, provenance)
    version = tracker.log_model(folder, cfg.tracking.model_name,
                                tags={"run_id": tracker.run_id, "data.manifest_sha256": tags["data.manifest_sha256"]})
    with open(os.path.join(folder, "registered.json"), "w") as f:
        json.dump({"name": cfg.tracking.model_name, "version": str(version)}, f)
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
