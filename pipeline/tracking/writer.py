"""Writing to the tracking store without ever stopping training.

A transient failure of the store (connection error, sqlite "database is locked", server
unavailable) is retried with exponential backoff (:class:`Retry`); :class:`Writer` runs
store operations in order on a background thread and drops, with a warning, what still
fails. Values written are masked (:func:`shards.storage.mask_secrets`) and cut to MLflow's
limits (:func:`value`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from mlflow.exceptions import MlflowException

from shards.errors import UserError
from shards.storage import mask_secrets

log = logging.getLogger(__name__)

_TRUNCATED = "...[truncated]"
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_TRANSIENT_TEXT = ("database is locked", "database is busy", "connection", "timed out", "temporarily")


def is_transient(e: BaseException) -> bool:
    """A failure of the store that may pass: worth retrying."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, MlflowException) and e.error_code in _TRANSIENT_CODES:
            return True
        name = type(e).__name__
        if name in ("OperationalError", "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout"):
            return True
        if any(t in str(e).lower() for t in _TRANSIENT_TEXT) and not isinstance(e, UserError):
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass(frozen=True)
class Retry:
    """Exponential backoff for transient failures: ``attempts`` tries, waits of base, 2*base, ... <= cap."""

    attempts: int = 6
    base_s: float = 1.0
    cap_s: float = 30.0

    def call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn``; retry transient failures; re-raise the last failure."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if not is_transient(e) or attempt == self.attempts:
                    raise
                wait = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
                log.warning("MLflow: %s failed (%s: %s); retry %d/%d in %.1fs",
                            what, type(e).__name__, short(e), attempt, self.attempts - 1, wait)
                time.sleep(wait)


def short(e: BaseException, n: int = 200) -> str:
    """The first line of ``e``'s message, masked, at most ``n`` characters: for a log line."""
    s = mask_secrets(str(e)).strip().splitlines()
    return (s[0] if s else "")[:n]


def value(v: Any, limit: int) -> str:
    """A param or tag value: credentials masked, cut to ``limit`` characters."""
    v = mask_secrets(str(v))
    return v if len(v) <= limit else v[: limit - len(_TRUNCATED)] + _TRUNCATED


def chunks(items: list, n: int) -> list[list]:
    """``items`` in lists of at most ``n`` (MLflow's batch limits)."""
    return [items[i : i + n] for i in range(0, len(items), n)]


class Writer:
    """Runs store operations in order on one daemon thread; never raises to the caller."""

    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.failures = 0  # operations dropped after retries (or permanent errors)
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], what: str) -> None:
        self._q.put((fn, what))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, what = item
            try:
                self.retry.call(fn, what)
            except Exception as e:
                self.failures += 1
                log.warning("MLflow: %s dropped after %s (%s: %s); training continues",
                            what, "retries" if is_transient(e) else "a permanent error", type(e).__name__, short(e))

    def drain(self, timeout: float | None) -> bool:
        """Wait until everything submitted so far is done (or dropped); False on timeout."""
        done = threading.Event()
        self._q.put((done.set, "flush marker"))
        return done.wait(timeout)

    def close(self, timeout: float | None) -> bool:
        ok = self.drain(timeout)
        self._q.put(None)
        if ok:
            self._thread.join(timeout)
        return ok
