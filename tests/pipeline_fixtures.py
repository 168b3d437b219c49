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
The steps and checks of a submitted pretraining job that loses a worker are in
``resume_checks``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import psutil
import pytest

from conftest import free_port
from pipeline.config import Config, load_config

if TYPE_CHECKING:
    from resume_checks import KillAfterCheckpoint

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
