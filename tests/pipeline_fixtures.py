"""Shared, prepared data for the training tests: the CI config's synthetic sources, their
shards, reference bank and centers, built once per test session in a temporary folder.

Tests take a config pointing at that data with :func:`ci_config` (a run name, storage and
MLflow store of their own, the prepared shards, bank and centers shared) or the same
settings as command-line overrides with :func:`ci_overrides`.

Load it as a plugin (``pytest_plugins = ["pipeline_fixtures"]`` in a test module), not by
importing the fixtures: imported fixtures are registered per module, and a session fixture
would be built once per module.

Ray runs in this process only while the data is prepared (shards, centers), unless a Ray
is already running here, which is then left as it is. A local Ray is started with
``address="local"``, so it never joins another cluster of this machine.

:func:`ray_head` (one node) and :func:`ray_two_nodes` (a head and a second node) are Ray
clusters started by `ray start` on 127.0.0.1 (for `ray job submit`), stopped by the pids of
what they started, never by `ray stop`, which would end every Ray of the machine.
:class:`KillAfterCheckpoint`, :func:`check_killed_and_resumed` and
:func:`check_registered_model_loads` are the steps and checks of a submitted pretraining
job that loses a worker.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from conftest import free_port
from pipeline.config import Config, load_config

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"


@dataclass(frozen=True)
class Prepared:
    """The prepared data of the session: ``root`` holds sources, shards, bank and centers."""

    root: Path

    @property
    def shards(self) -> Path:
        return self.root / "shards"


def ci_overrides(prepared: Prepared, run_dir: Path | None = None, name: str | None = None) -> list[str]:
    """Overrides of configs/ci.yaml (absolute paths) that use the prepared data; with
    ``run_dir``, the run's workdir, Ray storage and MLflow store go there."""
    out = [f"sources.{i}.root={prepared.root / 'data' / n}" for i, n in enumerate(("realiad", "visa", "btad", "mvtec"))]
    out.append(f"shards.url={prepared.shards}")
    if run_dir is not None:
        out += [
            f"workdir={run_dir / 'runs'}",
            f"train.storage={run_dir / 'ray-storage'}",
            f"tracking.uri=sqlite:///{run_dir / 'mlflow.db'}",
        ]
    if name is not None:
        out.append(f"name={name}")
    return out


def ci_config(prepared: Prepared, run_dir: Path, *extra: str, name: str | None = None) -> Config:
    """configs/ci.yaml on the prepared data, with the run's own folders and ``extra`` overrides."""
    return load_config(CI_CONFIG, [*ci_overrides(prepared, run_dir, name), *extra])


def start_local_ray(num_cpus: int = 2) -> bool:
    """Start a local Ray in this process unless one runs already; True when started here."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Prepared:
    """Synthetic sources -> shards -> reference bank -> centers of configs/ci.yaml, once."""
    import ray

    from pipeline.stages import Context, centers
    from pipeline.stages import shards as shards_stage

    data = Prepared(tmp_path_factory.mktemp("prepared"))
    cfg = ci_config(data, data.root / "prepare")
    started = start_local_ray()
    try:
        shards_stage.run(cfg, Context())
        centers.run(cfg, Context())  # builds the bank first
    finally:
        if started:
            ray.shutdown()
    return data


# ----------------------------------------------------------------------------- a Ray cluster started by `ray start`

TRAIN_WORKER = "RayTrainWorker"  # the actor class of Ray Train's workers


@dataclass(frozen=True)
class RayCluster:
    """Ray nodes on 127.0.0.1 started with ``ray start --block`` by this session: a head and
    the nodes that joined it."""

    dashboard: str  # http://127.0.0.1:<port>: the address for `ray job submit` and the state API
    env: dict  # the environment the cluster was started with (PATH leads to this venv)
    ray: str  # the `ray` command of this venv
    pids: tuple[int, ...]  # the `ray start` processes, the head's first: every process of a node descends from one

    def node_ids(self) -> list[str]:
        """The ids of the alive nodes, the head's first."""
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        return [n.node_id for n in sorted(nodes, key=lambda n: not n.is_head_node)]

    def train_workers(self, *filters: tuple[str, str, str]) -> list:
        """Ray Train's worker actors on this cluster, dead ones included, with their node id,
        pid and placement group (Ray's state API)."""
        from ray.util.state import list_actors

        return list_actors(address=self.dashboard, filters=[("class_name", "=", TRAIN_WORKER), *filters],
                           detail=True, raise_on_missing_output=False)

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is a process of this cluster."""
        for root in self.pids:
            try:
                if any(p.pid == pid for p in psutil.Process(root).children(recursive=True)):
                    return True
            except psutil.NoSuchProcess:
                continue
        return False

    def submit_pretrain(self, overrides: list[str], killer: KillAfterCheckpoint) -> str:
        """``ray job submit --working-dir <repo> -- python launch/pretrain.py --config
        configs/ci.yaml <overrides>`` while ``killer`` watches; returns the job's output once
        the job succeeded. Data and outputs are absolute paths: the upload holds code only."""
        cmd = [self.ray, "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO), "--",
               "python", "launch/pretrain.py", "--config", str(CI_CONFIG.relative_to(REPO)), *overrides]
        killer.start()
        try:
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=1500)
        finally:
            killer.stop.set()
            killer.join()
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-6000:]
        assert "succeeded" in log, log[-3000:]
        return log


def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with code {proc.returncode} before its dashboard answered; "
                               f"its output: {log}")
        try:
            with urllib.request.urlopen(url + "/api/version", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the Ray dashboard at {url} did not answer within {timeout:.0f} s; `ray start` output: {log}")


def _wait_for_nodes(cluster: RayCluster, procs: list[subprocess.Popen], timeout: float, logs: list[Path]) -> None:
    from ray.util.state.exception import RayStateApiException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with code {proc.returncode}; its output: {log}")
        try:
            if len(cluster.node_ids()) == len(procs):
                return
        except (RayStateApiException, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"{len(procs)} Ray nodes were not alive within {timeout:.0f} s; `ray start` output: {logs}")


def _stop_trees(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM every ``ray start --block`` of ``procs`` (each takes its Ray processes down);
    after ``grace`` seconds, SIGKILL what is left of them and of the processes they started,
    by pid: never other Ray clusters of this machine."""
    tree = []
    for proc in procs:
        try:
            tree += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=max(0.1, deadline - time.monotonic()))
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=15)


@contextlib.contextmanager
def ray_cluster(log_dir: Path, nodes: int = 1) -> Iterator[RayCluster]:
    """``nodes`` Ray nodes of 2 CPUs on 127.0.0.1: ``ray start --head`` (dashboard on a free
    port), then ``ray start --address`` for every further node, all on loopback, each in a
    temp folder of its own (so no other `ray.init()` of this machine joins them). Stopped
    afterwards with everything they started."""
    ray_cmd = os.path.join(os.path.dirname(sys.executable), "ray")
    # the jobs' python is the one on PATH when `ray start` runs: this venv's (conftest puts it first)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    gcs, dash = free_port(), free_port()
    url = f"http://127.0.0.1:{dash}"
    head = ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
            f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}"]
    procs: list[subprocess.Popen] = []
    temps: list[str] = []
    logs = [log_dir / f"ray-start-{i}.log" for i in range(nodes)]
    try:
        for i, log in enumerate(logs):
            temps.append(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))  # short: Ray's socket paths have a length limit
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [ray_cmd, "start", *(head if i == 0 else [f"--address=127.0.0.1:{gcs}"]), "--block",
                     "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                     f"--dashboard-agent-listen-port={free_port()}", "--temp-dir", temps[-1], "--disable-usage-stats"],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))
            if i == 0:
                _wait_for_dashboard(url, procs[0], timeout=300, log=log)
        cluster = RayCluster(url, env, ray_cmd, tuple(p.pid for p in procs))
        _wait_for_nodes(cluster, procs, timeout=300, logs=logs)
        yield cluster
    finally:
        _stop_trees(procs)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[RayCluster]:
    """A one-node Ray cluster (``ray start --head``) for the module."""
    with ray_cluster(tmp_path_factory.mktemp("ray-head")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def ray_two_nodes(s3_server, tmp_path_factory) -> Iterator[RayCluster]:
    """A head and a second node for the module, started once the S3 endpoint and keys are in
    the environment, so that every process of the cluster reaches the session's S3 server."""
    with ray_cluster(tmp_path_factory.mktemp("ray-two-nodes"), nodes=2) as cluster:
        yield cluster


# ----------------------------------------------------------------------------- a worker killed, the run resumed


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
