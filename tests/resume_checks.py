"""The steps and checks of a submitted pretraining job that loses a worker:
:class:`KillAfterCheckpoint` SIGKILLs a Ray Train worker once a checkpoint is registered,
:func:`check_killed_and_resumed` checks the run resumed from it and finished, and
:func:`check_registered_model_loads` that the registered model loads.

Import it after ``pytest.register_assert_rewrite("resume_checks")``, so its asserts report
their values.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline.config import Config
from pipeline_fixtures import RayCluster


def latest_checkpoint(storage_url: str) -> tuple[str, dict] | None:
    """The folder and metrics of the latest checkpoint Ray Train has registered for the one
    run in ``storage_url`` (a path or s3:// URL), from its snapshot in the run folder; None
    while there is none."""
    from shards import storage

    fs, root = storage.filesystem(storage_url)
    fs.invalidate_cache()  # s3fs caches listings
    snapshots = fs.glob(storage.join(root, "*", "checkpoint_manager_snapshot.json"))
    if len(snapshots) != 1:
        return None
    try:
        latest = json.loads(fs.cat_file(snapshots[0])).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    if not latest:
        return None
    run = posixpath.basename(posixpath.dirname(snapshots[0]))
    return storage.join(storage_url, run, latest["checkpoint_dir_name"]), latest["metrics"]


class KillAfterCheckpoint(threading.Thread):
    """SIGKILLs the Ray Train worker on node ``node_id`` of ``cluster`` once the run in
    ``storage_url`` has registered a checkpoint of step >= ``after``."""

    def __init__(self, cluster: RayCluster, storage_url: str, node_id: str, after: int,
                 timeout: float = 1200.0) -> None:
        super().__init__(daemon=True)
        self.cluster, self.storage_url, self.node_id, self.after, self.timeout = (
            cluster, storage_url, node_id, after, timeout)
        self.killed = None  # the worker's actor state when it was killed
        self.step_at_kill: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from ray.util.state.exception import RayStateApiException

        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            latest = latest_checkpoint(self.storage_url)
            step = latest[1].get("step") if latest else None
            if step is not None and step >= self.after:
                try:
                    workers = self.cluster.train_workers(("state", "=", "ALIVE"), ("node_id", "=", self.node_id))
                except (RayStateApiException, OSError):
                    workers = []
                workers = [w for w in workers if w.pid and self.cluster.owns(w.pid)]
                if workers:
                    os.kill(workers[0].pid, signal.SIGKILL)
                    self.killed, self.step_at_kill = workers[0], step
                    return
            time.sleep(0.5)


def check_killed_and_resumed(cfg: Config, killer: KillAfterCheckpoint, log: str, steps: int, every: int):
    """The job's run in MLflow after ``killer`` SIGKILLed a worker: the kill came after a
    registered checkpoint and before the end; the run restarted once, from the last checkpoint
    registered before the kill, and went on to ``steps`` with its lr schedule and metrics.
    Returns the MLflow run."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RUN_NAME_TAG
    from pipeline.train import lr_factor

    # the driver says where everything went
    assert f"pretraining finished: {steps} steps" in log
    assert f"registered      models:/{cfg.tracking.model_name}/1" in log

    assert killer.killed is not None, (
        f"no registered checkpoint of step >= {every} under {cfg.train.storage}, or no train worker on node "
        f"{killer.node_id}")
    assert not psutil.pid_exists(killer.killed.pid) or psutil.Process(killer.killed.pid).status() == "zombie"
    assert killer.step_at_kill < steps, "the worker was killed only after the last checkpoint"

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[RUN_NAME_TAG].startswith(cfg.name)
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == str(cfg.train.num_workers)
    assert run.data.params["train.deepspeed.zero_stage"] == str(cfg.train.deepspeed.zero_stage)
    assert len(run.data.tags["data.manifest_sha256"]) == 64

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    # one restart, from the last checkpoint registered before the kill (not from scratch)
    resumed = history("resumed_from_step")
    assert len(resumed) == 1, resumed
    start = int(resumed[0][1])
    assert killer.step_at_kill <= start < steps and start % every == 0, (killer.step_at_kill, start)
    # every step after the resume point ran after the restart, up to train.steps
    loss = history("loss")
    assert {s for s, _ in loss} >= set(range(start + 1, steps + 1)) and max(s for s, _ in loss) == steps
    assert all(math.isfinite(v) for _, v in loss)
    # the lr schedule went on where it was: the scheduler state came back with the engine
    for s, v in history("lr"):
        assert v == pytest.approx(cfg.train.lr * lr_factor(s - 1, cfg, cfg.train.num_workers), rel=1e-6), (s, v)
    ckpts = {int(v) for _, v in history("checkpoint/step")}
    assert ckpts <= set(range(every, steps + 1, every)) and max(ckpts) == steps
    assert all(v > 0 for _, v in history("samples_per_s"))
    assert all(0 <= v <= 1 for _, v in history("data_wait_fraction"))
    for key in ("angle/l0", "norm1/l0", "norm2/l1", "k", "skipped_samples", "defects_too_small"):
        assert history(key), key
    final = f"checkpoints/step-{steps:07d}"
    assert {a.path for a in client.list_artifacts(run.info.run_id, final)} == {
        f"{final}/projector.safetensors", f"{final}/checkpoint.json"}
    return run


def check_registered_model_loads(cfg: Config, run, cache_dir: Path) -> None:
    """Version 1 of the registered model belongs to ``run``, holds the exported projector,
    and loads as a feature extractor and through MLflow's pyfunc loader, with the same
    features of the right shapes."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from pipeline.export import load_feature_extractor
    from pipeline.tracking import load_registered

    client = MlflowClient(cfg.tracking.uri)
    versions = client.search_model_versions(f"name = '{cfg.tracking.model_name}'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == run.info.run_id
    assert versions[0].tags["data.manifest_sha256"] == run.data.tags["data.manifest_sha256"]
    folder = load_registered(f"models:/{cfg.tracking.model_name}/1", tracking_uri=cfg.tracking.uri,
                             cache_dir=str(cache_dir))
    exported = Path(cfg.workdir) / cfg.name / "export"
    registered, trained = load_file(Path(folder) / "projector.safetensors"), load_file(exported / "projector.safetensors")
    assert registered.keys() == trained.keys() and all(torch.equal(registered[k], trained[k]) for k in trained)

    # it loads and produces features of the right shapes
    extractor = load_feature_extractor(folder)
    gen = torch.Generator().manual_seed(0)
    size = cfg.backbone.image_size
    images, refs = torch.rand(3, 3, size, size, generator=gen), torch.rand(2, 3, size, size, generator=gen)
    feats = extractor.features(images, refs)
    grid = extractor.spec["grid"]
    assert [tuple(f.shape) for f in feats] == [(3, w, grid, grid) for w in extractor.spec["widths"]]
    assert all(torch.isfinite(f).all() for f in feats)

    # the same version through MLflow's own loader (the pyfunc feature extractor)
    model = mlflow.pyfunc.load_model(str(Path(folder).parents[1]))
    predicted = model.predict({"images": images.numpy(), "refs": refs.numpy()})
    for i, f in enumerate(feats):
        np.testing.assert_allclose(predicted[f"level_{i}"], f.numpy(), rtol=1e-5, atol=1e-5)
