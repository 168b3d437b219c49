"""End to end on a real Ray cluster: `ray start --head` on 127.0.0.1, then

    ray job submit --working-dir <repo> -- python launch/pretrain.py --config configs/ci.yaml <overrides>

trains with 2 workers (gloo, DeepSpeed ZeRO-1, bf16 autocast). One worker is SIGKILLed after
the first checkpoint: Ray restarts the worker group, the run resumes from its last
checkpoint and finishes with the configured step count, the job exits 0, and MLflow holds
the run, its metrics and checkpoints, and a new registered model version that loads and
produces features. The data (prepared once per session) and every output live outside the
repository, referenced by absolute paths: the uploaded working directory holds code only.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

pytest.register_assert_rewrite("pipeline_fixtures")  # also loaded as the plugin below
from pipeline_fixtures import REPO, ci_overrides  # noqa: E402

pytest_plugins = ["pipeline_fixtures"]

# the kill comes after the first checkpoint is registered: 12 steps later the run would end
STEPS, EVERY = 14, 2


class KillAfterCheckpoint(threading.Thread):
    """SIGKILLs one Ray Train worker of the cluster under ``root_pid`` once the run in
    ``storage`` has registered a checkpoint of step >= ``after``."""

    def __init__(self, root_pid: int, storage: Path, after: int, timeout: float = 1200.0) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.storage, self.after, self.timeout = root_pid, storage, after, timeout
        self.killed_pid: int | None = None
        self.step_at_kill: int | None = None
        self.stop = threading.Event()

    def _latest_step(self) -> int | None:
        """Step of the latest checkpoint Ray Train has registered (its snapshot of the run's
        checkpoints, in the run folder; one run in this storage)."""
        snapshots = list(self.storage.glob("*/checkpoint_manager_snapshot.json"))
        if len(snapshots) != 1:
            return None
        try:
            latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            return None
        return latest.get("metrics", {}).get("step")

    def _workers(self) -> list[psutil.Process]:
        out = []
        for p in psutil.Process(self.root_pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            step = self._latest_step()
            if step is not None and step >= self.after:
                workers = self._workers()
                if workers:
                    self.step_at_kill = step
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    self.killed_pid = workers[-1].pid
                    return
            time.sleep(0.2)


def test_ray_job_submit_survives_a_killed_worker_and_registers_a_model_that_loads(prepared, ray_head, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.export import load_feature_extractor
    from pipeline.tracking import RUN_NAME_TAG, load_registered
    from pipeline.train import lr_factor

    overrides = [*ci_overrides(prepared, tmp_path, name="e2e-job"), f"train.steps={STEPS}",
                 f"train.checkpoint_every={EVERY}", "train.max_failures=2"]
    cfg = load_config(REPO / "configs" / "ci.yaml", overrides)
    assert cfg.train.num_workers == 2 and cfg.train.deepspeed.zero_stage == 1
    assert cfg.train.deepspeed.precision == "bf16" and not cfg.train.use_gpu
    cmd = [ray_head.ray, "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(REPO), "--",
           "python", "launch/pretrain.py", "--config", "configs/ci.yaml", *overrides]
    killer = KillAfterCheckpoint(ray_head.pid, Path(cfg.train.storage), after=EVERY)
    killer.start()
    try:
        out = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=1500)
    finally:
        killer.stop.set()
        killer.join()
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "succeeded" in log, log[-3000:]
    # the driver says where everything went
    assert f"pretraining finished: {STEPS} steps" in log
    assert f"registered      models:/{cfg.tracking.model_name}/1" in log

    # the kill: after a registered checkpoint, before the end
    assert killer.killed_pid is not None, (
        f"no checkpoint_manager_snapshot.json with a step >= {EVERY} under {cfg.train.storage}, or no train worker")
    assert not psutil.pid_exists(killer.killed_pid) or psutil.Process(killer.killed_pid).status() == "zombie"
    assert killer.step_at_kill < STEPS, "the worker was killed only after the last checkpoint"

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[RUN_NAME_TAG].startswith("e2e-job")
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.params["train.deepspeed.zero_stage"] == "1"
    assert len(run.data.tags["data.manifest_sha256"]) == 64

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    # one restart, from the last checkpoint registered before the kill (not from scratch)
    resumed = history("resumed_from_step")
    assert len(resumed) == 1, resumed
    start = int(resumed[0][1])
    assert killer.step_at_kill <= start < STEPS and start % EVERY == 0, (killer.step_at_kill, start)
    # every step after the resume point ran after the restart, up to train.steps
    loss = history("loss")
    assert {s for s, _ in loss} >= set(range(start + 1, STEPS + 1)) and max(s for s, _ in loss) == STEPS
    assert all(math.isfinite(v) for _, v in loss)
    # the lr schedule went on where it was: the scheduler state came back with the engine
    for s, v in history("lr"):
        assert v == pytest.approx(cfg.train.lr * lr_factor(s - 1, cfg, 2), rel=1e-6), (s, v)
    ckpts = {int(v) for _, v in history("checkpoint/step")}
    assert ckpts <= set(range(EVERY, STEPS + 1, EVERY)) and max(ckpts) == STEPS
    assert all(v > 0 for _, v in history("samples_per_s"))
    assert all(0 <= v <= 1 for _, v in history("data_wait_fraction"))
    for key in ("angle/l0", "norm1/l0", "norm2/l1", "k", "skipped_samples", "defects_too_small"):
        assert history(key), key
    final = f"checkpoints/step-{STEPS:07d}"
    assert {a.path for a in client.list_artifacts(run_id, final)} == {
        f"{final}/projector.safetensors", f"{final}/checkpoint.json"}

    # a new registered version of this run, holding the exported projector
    versions = client.search_model_versions(f"name = '{cfg.tracking.model_name}'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == run_id
    assert versions[0].tags["data.manifest_sha256"] == run.data.tags["data.manifest_sha256"]
    folder = load_registered(f"models:/{cfg.tracking.model_name}/1", tracking_uri=cfg.tracking.uri,
                             cache_dir=str(tmp_path / "model-cache"))
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
