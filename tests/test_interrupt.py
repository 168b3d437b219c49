"""`adpretrain build-shards` on its own local Ray, interrupted mid-build: SIGINT and SIGTERM end it
in order and leave no process it started; after a SIGKILL, the reaper started with the local
Ray (pipeline.reaper) ends what Ray itself does not: its agents.

Every process is watched through psutil as a descendant of the CLI while it runs (raylet,
gcs_server, the agents, the workers), and checked by pid and start time after it ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.config import load_config
from shards.synth import generate

# Ray's two agents do not notice that their raylet was SIGKILLed (each holds the other's pipe
# from the raylet open): with the driver SIGKILLed they stay until the reaper kills them.
AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
REAPER_S = 10  # the reaper polls twice a second


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Enough images for a build of one image per shard, one task at a time, to last seconds."""
    root = tmp_path_factory.mktemp("interrupt") / "data"
    generate("mvtec", root, classes=2, normal=300, abnormal=10, size=128, seed=7)
    return root


def write_config(data: Path, tmp: Path) -> Path:
    cfg = load_config({
        "name": "interrupt",
        "sources": [{"name": "mv", "layout": "mvtec", "root": str(data), "split": "pretrain"}],
        "shards": {"url": str(tmp / "shards"), "max_samples_per_shard": 1, "tasks": 1},
        "backbone": {"levels": [1], "weights": "random"},
        "train": {"steps": 1, "storage": str(tmp / "train")},
        "ray": {"num_cpus": 1},
    })
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


class Build:
    """`adpretrain build-shards` in a subprocess, with every descendant it ever had."""

    def __init__(self, data: Path, tmp: Path) -> None:
        self.shards = tmp / "shards"
        self.log = tmp / "cli.log"
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL")}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "build-shards", str(write_config(data, tmp))],
                cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.seen: dict[tuple[int, float], str] = {}

    def record(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for c in children:
            try:
                self.seen[(c.pid, c.create_time())] = c.name()
            except psutil.NoSuchProcess:
                pass

    def wait_mid_build(self, timeout: float = 240.0) -> None:
        """Until the local Ray is up and some shards are committed, recording descendants."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.record()
            assert self.proc.poll() is None, f"the build ended before it was interrupted:\n{self.output()}"
            up = "started a local Ray" in self.output()
            if up and len(list(self.shards.rglob("*.tar.json"))) >= 3:
                time.sleep(0.5)
                self.record()
                return
            time.sleep(0.1)
        raise AssertionError(f"no shard committed on a local Ray within {timeout}s:\n{self.output()}")

    def signal_and_wait(self, signum: int, timeout: float = 120.0) -> int:
        self.proc.send_signal(signum)
        deadline = time.time() + timeout
        while self.proc.poll() is None and time.time() < deadline:
            self.record()
            time.sleep(0.1)
        return self.proc.wait(timeout=1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> dict[int, str]:
        """Recorded descendants still running (same pid, same start time, not a zombie)."""
        out = {}
        for (pid, started), name in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                    out[pid] = name
            except psutil.NoSuchProcess:
                pass
        return out

    def left_after(self, seconds: float) -> dict[int, str]:
        """What still runs after up to ``seconds`` (the reaper ends the rest shortly after the CLI)."""
        deadline = time.time() + seconds
        while self.alive() and time.time() < deadline:
            time.sleep(0.2)
        return self.alive()

    def kill_left(self) -> None:
        for pid in self.alive():
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def build(data, tmp_path):
    b = Build(data, tmp_path)
    yield b
    if b.proc.poll() is None:
        b.proc.kill()
        b.proc.wait()
    b.kill_left()


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
                         ids=["SIGINT", "SIGTERM", "SIGINT-twice"])
def test_interrupted_build_shuts_its_local_ray_down(build: Build, signals: list[int]):
    build.wait_mid_build()
    names = set(build.seen.values())
    assert {"raylet", "gcs_server"} <= names and AGENTS <= names, names
    *first, signum = signals
    for s in first:  # Ctrl-C, then Ctrl-C again while it shuts down
        build.proc.send_signal(s)
        time.sleep(0.5)
    rc = build.signal_and_wait(signum)
    out = build.output()
    assert build.left_after(REAPER_S) == {}, f"left running: {build.alive()}\n{out}"
    assert rc == 128 + signum, out
    assert f"adpretrain build-shards: interrupted by {signal.Signals(signum).name}" in out
    assert "Traceback" not in out, out
    assert not (build.shards / "manifest.json").exists()  # interrupted mid-build: no manifest claims it done


def test_a_sigkilled_driver_leaves_nothing_running(build: Build):
    build.wait_mid_build()
    assert "pipeline.reaper" in " ".join(" ".join(p.cmdline()) for p in psutil.Process(build.proc.pid).children())
    rc = build.signal_and_wait(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    # raylet, gcs_server and the workers die with the driver; the reaper kills Ray's agents
    assert build.left_after(30) == {}, f"left running after a SIGKILL: {build.alive()}"


def test_a_finished_build_stops_its_ray_and_reaper_at_once(build: Build):
    deadline = time.time() + 300
    while build.proc.poll() is None and time.time() < deadline:
        build.record()
        time.sleep(0.1)
    out = build.output()
    assert build.proc.wait(timeout=1) == 0, out
    assert "left running after the Ray shutdown" not in out, out  # nothing, the reaper included, outlived ray.shutdown
    assert build.left_after(REAPER_S) == {}, f"left running: {build.alive()}"
