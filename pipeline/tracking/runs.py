"""One MLflow run per training (or evaluation) run: :class:`RunTracker`, and reading runs back.

Training never waits for, and is never stopped by, the tracking store: metrics are
buffered and written with ``log_batch`` by a background thread
(:class:`pipeline.tracking.writer.Writer`); a transient failure is retried with
exponential backoff and then dropped with a warning.

Credentials inside URLs (``http://user:password@host``, ``s3://key:secret@bucket``) never
reach the store or the logs: params, tags, the config artifact, log lines and error
messages show them as ``***`` (:func:`shards.storage.mask_secrets`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from pipeline.config import Config, TrackingSpec, resolve_uri
from pipeline.export import SPEC_FILE
from pipeline.tracking.pyfunc import MODEL_ARTIFACT, save_pyfunc
from pipeline.tracking.registry import ensure_registered_model
from pipeline.tracking.store import check_server, connect, experiment_id, resolved, scheme
from pipeline.tracking.writer import Retry, Writer, chunks, short, value
from shards.errors import UserError
from shards.storage import mask_secrets

log = logging.getLogger(__name__)

RUN_NAME_TAG = "adpretrain.run_name"
CHECKPOINTS = "checkpoints"  # the artifact folder of a training run's checkpoints
CHECKPOINT_FILE = "checkpoint.json"  # in each checkpoint's folder: its step, storage URI and weights file


def checkpoint_artifact(step: int) -> str:
    """The artifact folder of a run's checkpoint at ``step``: ``checkpoints/step-XXXXXXX``."""
    return f"{CHECKPOINTS}/step-{int(step):07d}"


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
        self.client = connect(self.uri)
        self.retry = retry
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._pending: list[Metric] = []
        self._calls = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._writer = Writer(retry)
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
        retry: Retry = options.get("retry", Retry())
        if scheme(uri) in ("http", "https"):
            check_server(uri)
        client = connect(uri)
        try:
            exp_id = retry.call(lambda: experiment_id(client, spec.experiment, uri), "open experiment")
            run = retry.call(lambda: _find_unfinished(client, exp_id, run_name), "search runs")
            all_tags = {**{k: value(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()}, RUN_NAME_TAG: run_name}
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
            params = {k: value(v, MAX_PARAM_VAL_LENGTH) for k, v in cfg.flat().items()}
            new = [Param(k, v) for k, v in params.items() if k not in existing]
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            if changed:
                log.warning("MLflow run %s resumed with a changed config: %s", run_id, ", ".join(changed))
                all_tags["adpretrain.resume.changed_params"] = value(",".join(changed), MAX_TAG_VAL_LENGTH)
            tag_objs = [RunTag(k, v) for k, v in all_tags.items()]
            for chunk in chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
                retry.call(lambda c=chunk: client.log_batch(run_id, params=c), "log params")
            for chunk in chunks(tag_objs, MAX_PARAMS_TAGS_PER_BATCH):
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
        retry: Retry = options.get("retry", Retry())
        try:
            run = retry.call(lambda: connect(uri).get_run(run_id), "get run")
        except MlflowException as e:
            hint = " (a relative sqlite path resolves against the current directory)" if scheme(uri) == "sqlite" else ""
            raise UserError(mask_secrets(f"MLflow run {run_id} not found at {uri}{hint}: {e.message}", uri)) from None
        options.setdefault("system_metrics_node", "rank0")
        return cls(spec, run_id, run.info.experiment_id, **options)

    def _start_system_metrics(self, node: str | None) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(self.run_id, node_id=node, tracking_uri=self.uri, resume_logging=True)
            self._monitor.start()
        except Exception as e:  # psutil missing, store hiccup: the run goes on without them
            log.warning("MLflow: system metrics are off (%s: %s)", type(e).__name__, short(e))
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
        for chunk in chunks(rows, MAX_METRICS_PER_BATCH):
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
        folder = os.path.join(self._spool, os.path.basename(checkpoint_artifact(step)))
        os.makedirs(folder, exist_ok=True)
        shutil.copy2(projector_file, os.path.join(folder, os.path.basename(projector_file)))
        with open(os.path.join(folder, CHECKPOINT_FILE), "w") as f:
            json.dump({"step": int(step), "storage_uri": mask_secrets(storage_uri),
                       "projector": os.path.basename(projector_file)}, f, indent=2)
        ts = int(time.time() * 1000)
        self._submit_pending()

        def write() -> None:
            self.client.log_batch(
                self.run_id,
                metrics=[Metric("checkpoint/step", float(step), ts, int(step))],
                tags=[RunTag("adpretrain.checkpoint.latest", value(storage_uri, MAX_TAG_VAL_LENGTH)),
                      RunTag("adpretrain.checkpoint.latest_step", str(int(step)))],
            )
            self.client.log_artifacts(self.run_id, folder, checkpoint_artifact(step))
            shutil.rmtree(folder, ignore_errors=True)

        self._writer.submit(write, f"checkpoint record of step {step}")

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        """Upload a folder into the run (retried; a failure is a warning, not an exception)."""
        self._sync(lambda: self.client.log_artifacts(self.run_id, local_dir, artifact_path),
                   f"upload of {local_dir}")

    def _sync(self, fn: Callable[[], Any], what: str) -> None:
        try:
            self.retry.call(fn, what)
        except Exception as e:
            self._writer.failures += 1
            log.warning("MLflow: %s failed (%s: %s); continuing", what, type(e).__name__, short(e))

    # ---- the model

    def log_model(self, export_dir: str, registered_name: str, tags: dict[str, str]) -> str:
        """Log the exported projector folder as a pyfunc model of this run and register it.

        Returns the new version of ``registered_name``; its tags are ``tags`` plus the run id.
        Raises :class:`UserError` when the store cannot take it.
        """
        if not os.path.isfile(os.path.join(export_dir, SPEC_FILE)):
            raise UserError(f"{export_dir!r} is not an exported projector folder (spec.json is missing)")
        self.flush()
        c = self.client
        version_tags = {**{k: value(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()},
                        "adpretrain.run_id": self.run_id}
        try:
            model = self.retry.call(
                lambda: c.create_logged_model(self.experiment_id, name=MODEL_ARTIFACT, source_run_id=self.run_id,
                                              tags=version_tags, model_type="feature-extractor"),
                "create logged model")
            self.retry.call(lambda: c.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)]),
                            "link model to run")
            with tempfile.TemporaryDirectory(prefix="adpretrain-model-") as tmp:
                local = save_pyfunc(export_dir, os.path.join(tmp, "model"), self.run_id, model)
                self.retry.call(lambda: c.log_model_artifacts(model.model_id, local), "upload model")
            self.retry.call(lambda: c.finalize_logged_model(model.model_id, "READY"), "finalize model")
            self.retry.call(lambda: ensure_registered_model(c, registered_name), "create registered model")
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
        self._stop_system_metrics()
        self._sync(lambda: self.client.set_terminated(self.run_id, status), f"mark run {status}")
        self._release(timeout)

    def close(self, timeout: float | None = 300.0) -> None:
        """Flush and let go of this handle without ending the run (a handle :meth:`attach` gave to
        another process): its system metrics, writer thread and spool folder stop or go."""
        self.flush(timeout)
        self._stop_system_metrics()
        self._release(timeout)

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def _release(self, timeout: float | None) -> None:
        self._writer.close(timeout)
        shutil.rmtree(self._spool, ignore_errors=True)

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _find_unfinished(client: MlflowClient, exp_id: str, run_name: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    for run in runs:
        if run.info.status != "FINISHED":
            return run
    return None


def run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether the store at ``tracking_uri`` holds run ``run_id``."""
    try:
        connect(resolve_uri(tracking_uri)).get_run(run_id)
    except MlflowException:
        return False
    return True


def metric_histories(tracking_uri: str, run_id: str, keep: Callable[[str], bool]) -> dict[str, list[tuple[int, float]]]:
    """The history of each metric of run ``run_id`` whose name ``keep`` accepts, as (step, value)
    sorted by step; metrics by name, in name order."""
    c = connect(resolve_uri(tracking_uri))
    keys = sorted(k for k in c.get_run(run_id).data.metrics if keep(k))
    return {k: [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in keys}


def checkpoint_steps(tracking_uri: str, run_id: str) -> list[int]:
    """The steps of the checkpoints recorded in run ``run_id`` (:meth:`RunTracker.log_checkpoint`), in order."""
    uri = resolve_uri(tracking_uri)
    try:
        found = connect(uri).list_artifacts(run_id, CHECKPOINTS)
    except MlflowException as e:
        raise UserError(mask_secrets(f"MLflow run {run_id} at {uri}: cannot list its checkpoints: {e.message}",
                                     uri)) from None
    names = [os.path.basename(a.path) for a in found if a.is_dir]
    return sorted(int(n[len("step-"):]) for n in names if re.fullmatch(r"step-\d+", n))


def download_checkpoint(tracking_uri: str, run_id: str, step: int, dst: str) -> str:
    """The projector weights of the checkpoint at ``step`` of run ``run_id``, downloaded into the
    folder ``dst``; returns their path."""
    uri = resolve_uri(tracking_uri)
    try:
        folder = connect(uri).download_artifacts(run_id, checkpoint_artifact(step), dst)
    except MlflowException as e:
        raise UserError(mask_secrets(f"MLflow run {run_id} at {uri}: cannot download checkpoint "
                                     f"{checkpoint_artifact(step)}: {e.message}", uri)) from None
    with open(os.path.join(folder, CHECKPOINT_FILE)) as f:
        return os.path.join(folder, json.load(f)["projector"])
