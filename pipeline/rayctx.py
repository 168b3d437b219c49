"""Joining a Ray cluster, or starting a local one, the same way for every stage; and stopping
the local one, with every process it started, whatever way the stage ends."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading

from pipeline.config import RayInit
from shards.errors import UserError
from shards.storage import mask_secrets

log = logging.getLogger(__name__)

_started_local = False  # this process started the local Ray it is connected to
_reaper: subprocess.Popen | None = None  # the watcher of a local Ray (pipeline.reaper)


def cluster_address(spec: RayInit) -> str | None:
    """The Ray cluster a stage joins (``ray.address``, else RAY_ADDRESS); None: it starts a local Ray."""
    return spec.address or os.environ.get("RAY_ADDRESS")


def init_ray(spec: RayInit) -> None:
    """Connect to ``spec.address`` (or RAY_ADDRESS, set by `ray job submit`); with neither,
    start a local Ray, whose workers inherit this process's environment.

    A job submitted to a cluster keeps the runtime environment it was submitted with
    (working directory, `--runtime-env-json` variables such as AWS_ENDPOINT_URL); nothing here
    overrides it. A local Ray on a dev box runs without token auth (RAY_AUTH_MODE=disabled)
    unless the environment says otherwise, so a later `ray start` + `ray job submit` keeps working.
    ``ray.init`` replaces the SIGTERM handler with one that exits; a handler of the caller's own
    (the CLI's orderly interruption) is put back.
    """
    import ray

    global _started_local
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cluster_address(spec)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise UserError(mask_secrets(
                f"cannot join the Ray cluster at {address!r}: {e}. Start it (`ray start --head`) "
                "or unset RAY_ADDRESS / ray.address to run on a local Ray."
            )) from None
        log.info("joined Ray cluster at %s", mask_secrets(address))
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        _started_local = True  # before the start: an interrupted start is shut down as well
        _start_reaper()
        ray.init(num_cpus=spec.num_cpus, include_dashboard=False)
        log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)


def _start_reaper() -> None:
    """:mod:`pipeline.reaper` watches this process: whatever way it ends (SIGKILL, or an abort
    inside Ray, included), what its local Ray left running is killed. In a session of its own,
    so that a Ctrl-C at the terminal does not reach it."""
    global _reaper
    _reaper = subprocess.Popen([sys.executable, "-m", "pipeline.reaper", str(os.getpid())], start_new_session=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_reaper() -> None:
    """The local Ray is down: its watcher has nothing left to do."""
    global _reaper
    if _reaper is not None:
        _reaper.terminate()
        _reaper.wait()
        _reaper = None


def shutdown_local_ray(timeout: float = 10.0) -> None:
    """Stop the local Ray this process started, and every process it spawned; nothing when
    this process joined a cluster (or started no Ray).

    SIGINT and SIGTERM are ignored meanwhile, so that a second Ctrl-C cannot cut the shutdown
    short. What ``ray.shutdown`` does not stop within ``timeout`` seconds is killed: the agents
    of a start-up that was interrupted are unknown to Ray.

    A SIGKILLed process runs none of this: its raylet, gcs_server and workers die with it, and
    the reaper started with the local Ray (:mod:`pipeline.reaper`) kills Ray's dashboard and
    runtime-env agents, which would keep running.
    """
    global _started_local
    if not _started_local:
        return
    import psutil
    import ray

    main = threading.current_thread() is threading.main_thread()
    held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        reaper = _reaper.pid if _reaper is not None else None
        spawned = [p for p in psutil.Process().children(recursive=True) if p.pid != reaper]
        ray.shutdown()
        _, alive = psutil.wait_procs(spawned, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                log.warning("killing %s (pid %d), left running after the Ray shutdown", p.name(), p.pid)
                p.kill()
        _started_local = False
        _stop_reaper()
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
