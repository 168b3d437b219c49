"""Everything MLflow: the tracking store, one run per training run, checkpoints, the model registry.

Stores: ``sqlite:///path.db`` (a relative path is taken from the current directory and
made absolute; artifacts go to ``mlartifacts/`` beside the database) or an MLflow
tracking server ``http(s)://host:port`` (its own artifact store).

Credentials inside URLs (``http://user:password@host``, ``s3://key:secret@bucket``) never
reach the store or the logs: params, tags, the config artifact, log lines and error
messages show them as ``***`` (:func:`shards.storage.mask_secrets`).

Training never waits for, and is never stopped by, the tracking store: metrics are
buffered and written with ``log_batch`` by a background thread; a transient failure
(connection error, sqlite "database is locked", server unavailable) is retried with
exponential backoff and then dropped with a warning.

The registered model is an MLflow pyfunc whose ``predict`` runs the exported feature
extractor (see :class:`ProjectorPyfunc` for its input and output).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import requests
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from pipeline.config import Config, TrackingSpec
from shards.errors import UserError
from shards.storage import mask_secrets

log = logging.getLogger(__name__)

RUN_NAME_TAG = "adpretrain.run_name"
VAL_TAG_PREFIX = "adpretrain.val."
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT = "projector"  # the exported folder inside the pyfunc model: data/projector/
_TRUNCATED = "...[truncated]"
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_TRANSIENT_TEXT = ("database is locked", "database is busy", "connection", "timed out", "temporarily")


# --------------------------------------------------------------------------- the store


def resolve_uri(uri: str) -> str:
    """The tracking URI with a relative sqlite path made absolute (against the current directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return uri


def resolved(spec: TrackingSpec) -> TrackingSpec:
    """``spec`` with an absolute URI: pass this one to processes that run in another directory."""
    return spec.model_copy(update={"uri": resolve_uri(spec.uri)})


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].lower() if ":" in uri else ""


def _quiet_mlflow(uri: str) -> None:
    """No telemetry; and no run link printed by MLflow when the URI holds credentials."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if mask_secrets(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///") :])


def ensure_store(spec: TrackingSpec) -> None:
    """Make the tracking store usable before any worker starts.

    sqlite: create the database, its folder and the experiment once, under a file lock
    (two processes creating a new database at once crash). http(s): check that the
    server answers, else :class:`UserError`. Sets MLFLOW_DISABLE_TELEMETRY=true.
    """
    uri = resolve_uri(spec.uri)
    _quiet_mlflow(uri)
    scheme = _scheme(uri)
    if scheme == "sqlite":
        _ensure_sqlite(uri, spec.experiment)
    elif scheme in ("http", "https"):
        _check_server(uri)
        try:
            _experiment_id(MlflowClient(uri), spec.experiment, uri)
        except MlflowException as e:
            raise UserError(mask_secrets(f"MLflow tracking server at {uri}: cannot open experiment "
                                         f"{spec.experiment!r}: {e.message}", uri)) from None
    else:
        raise UserError(mask_secrets(
            f"tracking.uri {spec.uri!r}: unsupported tracking store; use sqlite:///path/to/mlflow.db "
            "(one machine or a shared disk) or http(s)://host:port (an MLflow tracking server)"
        ))


def _ensure_sqlite(uri: str, experiment: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = _sqlite_path(uri)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = open(db.with_name(db.name + ".lock"), "a+")
    except OSError as e:
        raise UserError(f"tracking.uri {uri!r}: cannot create the database folder {db.parent}: {e}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Creating the store creates (or migrates) every table, the registry's included;
            # experiments created through it keep their artifacts beside the database.
            store = SqlAlchemyStore(uri, str(db.parent / "mlartifacts"))
            if store.get_experiment_by_name(experiment) is None:
                store.create_experiment(experiment)
                log.info("created MLflow experiment %r in %s", experiment, db)
        except MlflowException as e:
            raise UserError(f"tracking.uri {uri!r}: cannot open the MLflow database {db}: {e.message}") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_server(uri: str, timeout: float = 10.0) -> None:
    # requests (MLflow's own HTTP client) sends the URL's user:password as basic auth; any
    # answer, an error from a proxy or from auth included, means the server is reachable
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        reason = getattr(e, "reason", e)
        raise UserError(mask_secrets(
            f"MLflow tracking server at {uri} unreachable ({reason}). Start it (`mlflow server "
            "--backend-store-uri sqlite:///mlflow.db --host 0.0.0.0 --port 5000`) or set tracking.uri "
            "to sqlite:///mlflow.db", uri)) from None


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if _scheme(uri) == "sqlite":
        _ensure_sqlite(uri, name)
        return client.get_experiment_by_name(name).experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


# --------------------------------------------------------------------------- retries


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
                            what, type(e).__name__, _short(e), attempt, self.attempts - 1, wait)
                time.sleep(wait)


def _short(e: BaseException, n: int = 200) -> str:
    s = mask_secrets(str(e)).strip().splitlines()
    return (s[0] if s else "")[:n]


def _value(value: Any, limit: int) -> str:
    """A param or tag value: credentials masked, cut to ``limit`` characters."""
    value = mask_secrets(str(value))
    return value if len(value) <= limit else value[: limit - len(_TRUNCATED)] + _TRUNCATED


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


# --------------------------------------------------------------------------- background writer


class _Writer:
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
                            what, "retries" if is_transient(e) else "a permanent error", type(e).__name__, _short(e))

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


# --------------------------------------------------------------------------- runs


class RunTracker:
    """One MLflow run: params, tags, batched metrics, checkpoints, the registered model.

    Create with :meth:`start` (driver) or :meth:`attach` (rank 0 of the workers). Metric,
    checkpoint and artifact logging never raise on store failures; :meth:`start`,
    :meth:`attach` and :meth:`log_model` raise :class:`UserError`.
    Usable as a context manager: the run ends FINISHED, or FAILED on an exception.
    """

    def __init__(self, spec: TrackingSpec, run_id: str, experiment_id: str, *, flush_every: int = 20,
                 flush_seconds: float = 10.0, retry: Retry = Retry(), system_metrics_node: str | None = None) -> None:
        self.spec = resolved(spec)
        self.uri = self.spec.uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = _client(self.uri)
        self.retry = retry
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._pending: list[Metric] = []
        self._calls = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._writer = _Writer(retry)
        self._spool = tempfile.mkdtemp(prefix="adpretrain-mlflow-")
        self._monitor = None
        if spec.system_metrics:
            self._start_system_metrics(system_metrics_node)

    # ---- creation

    @classmethod
    def start(cls, spec: TrackingSpec, cfg: Config, run_name: str, tags: dict[str, str],
              parent_run_id: str | None = None, **options: Any) -> "RunTracker":
        """Create the run, or resume the latest unfinished run of this experiment with ``run_name``.

        The flattened config is logged as params (values cut to MLflow's length limit; the
        whole config is also an artifact ``config.json``; credentials in URLs masked in both).
        On resume, params already there are kept; changed values are reported in the tag
        ``adpretrain.resume.changed_params``.
        ``options`` go to the constructor (flush_every, flush_seconds, retry, system_metrics_node).
        """
        if any(c in run_name for c in "'\"\\`"):
            raise UserError(f"run name {run_name!r}: quotes and backslashes are not allowed in run names")
        uri = resolve_uri(spec.uri)
        _quiet_mlflow(uri)
        retry: Retry = options.get("retry", Retry())
        if _scheme(uri) in ("http", "https"):
            _check_server(uri)
        client = _client(uri)
        try:
            exp_id = retry.call(lambda: _experiment_id(client, spec.experiment, uri), "open experiment")
            run = retry.call(lambda: _find_unfinished(client, exp_id, run_name), "search runs")
            all_tags = {**{k: _value(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()}, RUN_NAME_TAG: run_name}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run is None:
                run = retry.call(lambda: client.create_run(exp_id, run_name=run_name, tags=all_tags), "create run")
                log.info("MLflow run %s (%s) created in %s", run.info.run_id, run_name, mask_secrets(uri))
                existing: dict[str, str] = {}
                resumes = 0
            else:
                log.info("MLflow run %s (%s) resumed (status was %s)", run.info.run_id, run_name, run.info.status)
                retry.call(lambda: client.update_run(run.info.run_id, status="RUNNING"), "mark run running")
                existing = dict(run.data.params)
                resumes = int(run.data.tags.get("adpretrain.resumes", "0")) + 1
                all_tags["adpretrain.resumes"] = str(resumes)
            run_id = run.info.run_id
            params = {k: _value(v, MAX_PARAM_VAL_LENGTH) for k, v in cfg.flat().items()}
            new = [Param(k, v) for k, v in params.items() if k not in existing]
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            if changed:
                log.warning("MLflow run %s resumed with a changed config: %s", run_id, ", ".join(changed))
                all_tags["adpretrain.resume.changed_params"] = _value(",".join(changed), MAX_TAG_VAL_LENGTH)
            tag_objs = [RunTag(k, v) for k, v in all_tags.items()]
            for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
                retry.call(lambda c=chunk: client.log_batch(run_id, params=c), "log params")
            for chunk in _chunks(tag_objs, MAX_PARAMS_TAGS_PER_BATCH):
                retry.call(lambda c=chunk: client.log_batch(run_id, tags=c), "set tags")
            config_name = "config.json" if resumes == 0 else f"config-resume-{resumes}.json"
            config_text = mask_secrets(json.dumps(cfg.to_dict(), indent=2))
            retry.call(lambda: client.log_text(run_id, config_text, config_name), "log config")
        except MlflowException as e:
            raise UserError(mask_secrets(
                f"MLflow tracking store {uri}: cannot start run {run_name!r}: {e.message}", uri)) from None
        options.setdefault("system_metrics_node", "driver")
        return cls(spec, run_id, exp_id, **options)

    @classmethod
    def attach(cls, spec: TrackingSpec, run_id: str, **options: Any) -> "RunTracker":
        """Log into an existing run (rank 0 of the workers logging into the driver's run)."""
        uri = resolve_uri(spec.uri)
        _quiet_mlflow(uri)
        retry: Retry = options.get("retry", Retry())
        try:
            run = retry.call(lambda: _client(uri).get_run(run_id), "get run")
        except MlflowException as e:
            hint = " (a relative sqlite path resolves against the current directory)" if _scheme(uri) == "sqlite" else ""
            raise UserError(mask_secrets(f"MLflow run {run_id} not found at {uri}{hint}: {e.message}", uri)) from None
        options.setdefault("system_metrics_node", "rank0")
        return cls(spec, run_id, run.info.experiment_id, **options)

    def _start_system_metrics(self, node: str | None) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(self.run_id, node_id=node, tracking_uri=self.uri, resume_logging=True)
            self._monitor.start()
        except Exception as e:  # psutil missing, store hiccup: the run goes on without them
            log.warning("MLflow: system metrics are off (%s: %s)", type(e).__name__, _short(e))
            self._monitor = None

    # ---- logging during training

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step``; written in one log_batch every ``flush_every`` calls
        or ``flush_seconds``, whichever comes first. Non-finite values are logged as they are."""
        ts = int(time.time() * 1000)
        rows = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        with self._lock:
            self._pending.extend(rows)
            self._calls += 1
            due = self._calls >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds
        if due:
            self._submit_pending()

    def _submit_pending(self) -> None:
        with self._lock:
            rows, self._pending, self._calls = self._pending, [], 0
            self._last_flush = time.monotonic()
        for chunk in _chunks(rows, MAX_METRICS_PER_BATCH):
            self._writer.submit(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c),
                                f"log_batch of {len(chunk)} metrics")

    def flush(self, timeout: float | None = 300.0) -> bool:
        """Write everything buffered and queued; False when the store did not finish in ``timeout`` s."""
        self._submit_pending()
        ok = self._writer.drain(timeout)
        if not ok:
            log.warning("MLflow: writes still pending after %.0fs; continuing without waiting", timeout)
        return ok

    @property
    def dropped(self) -> int:
        """Number of write operations given up (after retries or on a permanent error)."""
        return self._writer.failures

    def log_checkpoint(self, step: int, storage_uri: str, projector_file: str) -> None:
        """Record a checkpoint: metric ``checkpoint/step``, tags with its step and storage URI, and
        ``checkpoints/step-XXXXXXX/`` holding the projector weights and ``checkpoint.json``."""
        folder = os.path.join(self._spool, f"step-{int(step):07d}")
        os.makedirs(folder, exist_ok=True)
        shutil.copy2(projector_file, os.path.join(folder, os.path.basename(projector_file)))
        with open(os.path.join(folder, "checkpoint.json"), "w") as f:
            json.dump({"step": int(step), "storage_uri": mask_secrets(storage_uri),
                       "projector": os.path.basename(projector_file)}, f, indent=2)
        ts = int(time.time() * 1000)
        self._submit_pending()

        def write() -> None:
            self.client.log_batch(
                self.run_id,
                metrics=[Metric("checkpoint/step", float(step), ts, int(step))],
                tags=[RunTag("adpretrain.checkpoint.latest", _value(storage_uri, MAX_TAG_VAL_LENGTH)),
                      RunTag("adpretrain.checkpoint.latest_step", str(int(step)))],
            )
            self.client.log_artifacts(self.run_id, folder, f"checkpoints/step-{int(step):07d}")
            shutil.rmtree(folder, ignore_errors=True)

        self._writer.submit(write, f"checkpoint record of step {step}")

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        """Upload a folder into the run (retried; a failure is a warning, not an exception)."""
        self._sync(lambda: self.client.log_artifacts(self.run_id, local_dir, artifact_path),
                   f"upload of {local_dir}")

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` as the artifact file ``name`` (e.g. ``eval/table.md``)."""
        self._sync(lambda: self.client.log_text(self.run_id, text, name), f"text artifact {name}")

    def set_tags(self, tags: dict[str, str]) -> None:
        tag_objs = [RunTag(k, _value(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        self._writer.submit(lambda: self.client.log_batch(self.run_id, tags=tag_objs), "set tags")

    def _sync(self, fn: Callable[[], Any], what: str) -> None:
        try:
            self.retry.call(fn, what)
        except Exception as e:
            self._writer.failures += 1
            log.warning("MLflow: %s failed (%s: %s); continuing", what, type(e).__name__, _short(e))

    # ---- the model

    def log_model(self, export_dir: str, registered_name: str, tags: dict[str, str]) -> str:
        """Log the exported projector folder as a pyfunc model of this run and register it.

        Returns the new version of ``registered_name``; its tags are ``tags`` plus the run id.
        Raises :class:`UserError` when the store cannot take it.
        """
        if not os.path.isfile(os.path.join(export_dir, "spec.json")):
            raise UserError(f"{export_dir!r} is not an exported projector folder (spec.json is missing)")
        self.flush()
        c = self.client
        version_tags = {**{k: _value(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()},
                        "adpretrain.run_id": self.run_id}
        try:
            model = self.retry.call(
                lambda: c.create_logged_model(self.experiment_id, name=MODEL_ARTIFACT, source_run_id=self.run_id,
                                              tags=version_tags, model_type="feature-extractor"),
                "create logged model")
            self.retry.call(lambda: c.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)]),
                            "link model to run")
            with tempfile.TemporaryDirectory(prefix="adpretrain-model-") as tmp:
                local = _save_pyfunc(export_dir, os.path.join(tmp, "model"), self.run_id, model)
                self.retry.call(lambda: c.log_model_artifacts(model.model_id, local), "upload model")
            self.retry.call(lambda: c.finalize_logged_model(model.model_id, "READY"), "finalize model")
            self.retry.call(lambda: _ensure_registered_model(c, registered_name), "create registered model")
            mv = self.retry.call(
                lambda: c.create_model_version(registered_name, source=model.artifact_location,
                                               run_id=self.run_id, tags=version_tags, model_id=model.model_id,
                                               description=f"projector of run {self.run_id}"),
                "register model version")
        except MlflowException as e:
            raise UserError(mask_secrets(f"MLflow tracking store {self.uri}: cannot log and register the model "
                                         f"{registered_name!r}: {e.message}", self.uri)) from None
        log.info("registered %s version %s (run %s)", registered_name, mv.version, self.run_id)
        self._sync(lambda: c.set_tag(self.run_id, "adpretrain.registered_model", f"{registered_name}/{mv.version}"),
                   "tag registered version")
        return str(mv.version)

    # ---- the end

    def end(self, status: str = "FINISHED", timeout: float | None = 300.0) -> None:
        """Flush, stop system metrics, and mark the run FINISHED, FAILED or KILLED."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status {status!r} is not one of FINISHED, FAILED, KILLED")
        self.flush(timeout)
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._sync(lambda: self.client.set_terminated(self.run_id, status), f"mark run {status}")
        self._writer.close(timeout)
        shutil.rmtree(self._spool, ignore_errors=True)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _find_unfinished(client: MlflowClient, experiment_id: str, run_name: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    for run in runs:
        if run.info.status != "FINISHED":
            return run
    return None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="ADPretrain projector: residual features -> "
                                                         "anomaly representation (pyfunc feature extractor)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


# --------------------------------------------------------------------------- the pyfunc model


class ProjectorPyfunc:
    """The registered model: backbone -> residual against references -> projector.

    ``predict`` takes a dict of float32 arrays in [0, 1] at the backbone's image size:
    ``{"images": (B, 3, S, S), "refs": (K, 3, S, S)}`` (``refs``: K normal images of the
    same product) and returns ``{"level_0": (B, C0, h, w), "level_1": ...}``, the
    projected residual features per level. Loading needs this project installed.
    """

    def __init__(self, export_dir: str) -> None:
        from pipeline.export import load_feature_extractor

        self.extractor = load_feature_extractor(export_dir)

    def predict(self, model_input, params=None):
        import torch

        if not isinstance(model_input, dict) or not {"images", "refs"} <= set(model_input):
            raise UserError("the projector model takes {'images': (B,3,S,S), 'refs': (K,3,S,S)} float32 arrays in [0, 1]")
        images = torch.as_tensor(np.asarray(model_input["images"], dtype=np.float32))
        refs = torch.as_tensor(np.asarray(model_input["refs"], dtype=np.float32))
        feats = self.extractor.features(images, refs)
        return {f"level_{i}": f.float().cpu().numpy() for i, f in enumerate(feats)}


def _load_pyfunc(data_path: str) -> ProjectorPyfunc:
    """MLflow's entry point for the model (``loader_module``): ``data_path`` is the exported folder."""
    return ProjectorPyfunc(data_path)


def _save_pyfunc(export_dir: str, path: str, run_id: str, logged_model) -> str:
    import safetensors
    import timm
    import torch
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    # MLflow copies the data folder under its own name: data/projector/ whatever the export's name
    staged = shutil.copytree(export_dir, os.path.join(os.path.dirname(path), MODEL_ARTIFACT))
    image = TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))
    signature = ModelSignature(inputs=Schema([TensorSpec(image.type, image.shape, "images"),
                                              TensorSpec(image.type, image.shape, "refs")]))
    mlflow_model = Model(artifact_path=logged_model.artifact_location, run_id=run_id,
                         model_uuid=logged_model.model_id, model_id=logged_model.model_id)
    mlflow.pyfunc.save_model(
        path, loader_module=__name__, data_path=staged, signature=signature,
        mlflow_model=mlflow_model,
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                          f"timm=={timm.__version__}", f"safetensors=={safetensors.__version__}"],
        metadata={"adpretrain": "install this project (pip install -e .) to load the model"},
    )
    return path


# --------------------------------------------------------------------------- registry


def select_champion(spec: TrackingSpec, version: str, metric_name: str, value: float,
                    higher_is_better: bool = True) -> dict:
    """Move alias ``champion`` to ``version`` when ``value`` beats the current champion's, else
    set ``challenger``. Values are stored as the version tag ``adpretrain.val.<metric_name>``.

    Returns {decision, new_value, champion_value, version, previous_champion}; the decision and
    both numbers are also tagged on the version and logged into its training run.
    """
    if not math.isfinite(value):
        raise UserError(f"validation metric {metric_name} of version {version} is {value}: cannot rank it")
    uri = resolve_uri(spec.uri)
    client = _client(uri)
    name, tag = spec.model_name, VAL_TAG_PREFIX + metric_name
    try:
        mv = client.get_model_version(name, str(version))
        try:
            champ = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            champ = None
        champion_value = float(champ.tags[tag]) if champ is not None and tag in champ.tags else None
        previous = str(champ.version) if champ is not None else None
        if champ is None or previous == str(version):
            decision = CHAMPION
        elif champion_value is None:
            log.warning("champion %s v%s has no %s: promoting v%s", name, previous, tag, version)
            decision = CHAMPION
        else:
            better = value > champion_value if higher_is_better else value < champion_value
            decision = CHAMPION if better else CHALLENGER
        result = {
            "decision": decision,
            "new_value": float(value),
            "champion_value": champion_value,
            "version": str(version),
            "previous_champion": previous,
        }
        client.set_model_version_tag(name, str(version), tag, repr(float(value)))
        client.set_model_version_tag(name, str(version), "adpretrain.selection", json.dumps(result))
        client.set_registered_model_alias(name, decision, str(version))
    except MlflowException as e:
        raise UserError(mask_secrets(
            f"model selection for {name} version {version} at {uri} failed: {e.message}", uri)) from None
    log.info("model selection on %s: %s v%s = %.6g vs champion %s = %s -> %s", metric_name, name, version, value,
             result["previous_champion"], champion_value, decision)
    if mv.run_id:
        ts = int(time.time() * 1000)
        metrics = [Metric(f"val/{metric_name}", float(value), ts, 0)]
        if champion_value is not None:
            metrics.append(Metric(f"val/{metric_name}/champion", champion_value, ts, 0))
        try:
            client.log_batch(mv.run_id, metrics=metrics,
                             tags=[RunTag("adpretrain.selection", json.dumps(result))])
        except MlflowException as e:
            log.warning("model selection: could not record the decision in run %s: %s", mv.run_id,
                        mask_secrets(e.message, uri))
    return result


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def load_registered(model_uri: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> str:
    """Download a registered (``models:/NAME@alias``, ``models:/NAME/3``) or logged
    (``runs:/RUN/projector``, ``models:/<model id>``) model; return the local folder of the
    exported projector (``projector.safetensors``, ``centers.safetensors``, ``spec.json``).

    ``tracking_uri`` defaults to MLFLOW_TRACKING_URI, else sqlite:///mlflow.db. Downloads of
    registry versions are cached under ``cache_dir`` (default ~/.cache/adpretrain/models).
    """
    uri = resolve_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or TrackingSpec().uri)
    client = _client(uri)
    source, key = model_uri, f"uri-{hashlib.sha256(model_uri.encode()).hexdigest()[:16]}"
    m = _MODELS_URI.match(model_uri)
    try:
        # resolved here: MLflow's models:/ resolution reads the process-wide registry URI
        if m and (m["alias"] or m["version"]):
            mv = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
                  else client.get_model_version(m["name"], m["version"]))
            source = client.get_model_version_download_uri(m["name"], str(mv.version))
            key = f"{m['name']}-v{mv.version}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
        elif m:
            source = client.get_logged_model(m["name"]).artifact_location
    except MlflowException as e:
        raise UserError(mask_secrets(f"model {model_uri} not found in the registry at {uri}: {e.message}",
                                     uri)) from None
    cache = Path(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "adpretrain", "models"))
    target = cache / key
    folder = target / "data" / MODEL_ARTIFACT
    if (folder / "spec.json").is_file():
        return str(folder)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=cache)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri,
                                                    registry_uri=uri)
        if not (Path(local) / "data" / MODEL_ARTIFACT / "spec.json").is_file():
            raise UserError(f"model {model_uri} is not an adpretrain projector (no data/{MODEL_ARTIFACT}/spec.json)")
        try:
            os.replace(local, target)  # atomic: the cache never holds a partial model
        except OSError:  # another process finished the same download first
            pass
    except (MlflowException, OSError) as e:
        raise UserError(mask_secrets(f"cannot download model {model_uri} from {uri}: {e}", uri)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
