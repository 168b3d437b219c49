"""A watcher that outlives the process which started a local Ray, and ends what that Ray left.

``python -m pipeline.reaper PID`` records the descendants of process PID while it runs; once
PID is gone, however it went (an orderly exit, SIGKILL, an abort inside Ray), it kills the
recorded processes that still run. psutil compares start times, so a reused pid is never
killed. Ray's raylet, gcs_server and workers die with their driver, but its dashboard and
runtime-env agents do not: this is what ends them.
"""

from __future__ import annotations

import sys
import time

import psutil

POLL_S = 0.5


def watch(pid: int) -> int:
    """Record PID's descendants until it ends; then kill those still running. Returns how many."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    me = psutil.Process().pid
    seen: dict[int, psutil.Process] = {}
    while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
        try:
            seen.update((p.pid, p) for p in parent.children(recursive=True) if p.pid != me)
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    left = [p for p in seen.values() if p.is_running()]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(left)


if __name__ == "__main__":
    sys.exit(0 if watch(int(sys.argv[1])) >= 0 else 1)
