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

:func:`ray_head` is a Ray cluster started by `ray start --head` (for `ray job submit`),
stopped by the pids of what it started, never by `ray stop`, which would end every Ray of
the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

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

    from pipeline.backbone import build_backbone
    from pipeline.stages import compute_centers
    from shards.build import build_shards

    data = Prepared(tmp_path_factory.mktemp("prepared"))
    cfg = ci_config(data, data.root / "prepare")
    started = start_local_ray()
    try:
        build_shards(cfg)
        compute_centers(cfg, backbone=build_backbone(cfg.backbone))  # builds the bank first
    finally:
        if started:
            ray.shutdown()
    return data


# ----------------------------------------------------------------------------- a Ray cluster started by `ray start`


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RayHead:
    """A Ray head on 127.0.0.1 started with ``ray start --head --block`` by this session."""

    dashboard: str  # http://127.0.0.1:<port>: the address for `ray job submit`
    env: dict  # the environment the cluster was started with (PATH leads to this venv)
    ray: str  # the `ray` command of this venv
    pid: int  # the `ray start` process: every process of this cluster descends from it


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


def _stop_tree(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop ``ray start --block`` (it takes its Ray processes down) and then every process it
    started that is still alive, by pid: never other Ray clusters of this machine."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=15)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[RayHead]:
    """``ray start --head --num-cpus 2 --dashboard-host 127.0.0.1`` on free ports, in a temp
    folder of its own (so no other `ray.init()` of this machine joins it); stopped afterwards
    together with everything it started."""
    ray_cmd = os.path.join(os.path.dirname(sys.executable), "ray")
    # the jobs' python is the one on PATH when `ray start` runs: this venv's (conftest puts it first)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    log_path = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [ray_cmd, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", f"--port={free_port()}",
         "--num-cpus", "2", "--include-dashboard=true", "--dashboard-host", "127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         "--temp-dir", temp, "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, proc, timeout=300, log=log_path)
        yield RayHead(url, env, ray_cmd, proc.pid)
    finally:
        _stop_tree(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
