"""The tracking store: which one, making it usable, and the one way to reach it.

Stores: ``sqlite:///path.db`` (a relative path is taken from the current directory and
made absolute, :func:`pipeline.config.resolve_uri`; artifacts go to ``mlartifacts/``
beside the database) or an MLflow tracking server ``http(s)://host:port`` (its own
artifact store).

MLflow is quiet here, for every process that tracks: no telemetry (switched off before
``mlflow`` is imported, which starts its telemetry client), and no run link printed when
the URI holds credentials (:func:`connect`).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import requests  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.config import TrackingSpec, resolve_uri  # noqa: E402
from shards.errors import UserError  # noqa: E402
from shards.storage import mask_secrets  # noqa: E402

log = logging.getLogger(__name__)


def resolved(spec: TrackingSpec) -> TrackingSpec:
    """``spec`` with an absolute URI: pass this one to processes that run in another directory."""
    return spec.model_copy(update={"uri": resolve_uri(spec.uri)})


def scheme(uri: str) -> str:
    """``sqlite``, ``http``, ...: the URI's scheme, lower case ("" without one)."""
    return uri.split(":", 1)[0].lower() if ":" in uri else ""


def connect(uri: str) -> MlflowClient:
    """A client of the store at ``uri``, for its runs and its model registry.

    MLflow prints a link to a run when it ends: not when ``uri`` holds credentials.
    """
    if mask_secrets(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_store(spec: TrackingSpec) -> None:
    """Make the tracking store usable before any worker starts.

    sqlite: create the database, its folder and the experiment once, under a file lock
    (two processes creating a new database at once crash). http(s): check that the
    server answers, else :class:`UserError`.
    """
    uri = resolve_uri(spec.uri)
    kind = scheme(uri)
    if kind == "sqlite":
        ensure_sqlite(uri, spec.experiment)
    elif kind in ("http", "https"):
        check_server(uri)
        try:
            experiment_id(connect(uri), spec.experiment, uri)
        except MlflowException as e:
            raise UserError(mask_secrets(f"MLflow tracking server at {uri}: cannot open experiment "
                                         f"{spec.experiment!r}: {e.message}", uri)) from None
    else:
        raise UserError(mask_secrets(
            f"tracking.uri {spec.uri!r}: unsupported tracking store; use sqlite:///path/to/mlflow.db "
            "(one machine or a shared disk) or http(s)://host:port (an MLflow tracking server)"
        ))


def ensure_sqlite(uri: str, experiment: str) -> None:
    """Create the sqlite database at ``uri`` (absolute), its folder and ``experiment``, under a file lock."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = Path(uri[len("sqlite:///") :])
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


def check_server(uri: str, timeout: float = 10.0) -> None:
    """:class:`UserError` unless the tracking server at ``uri`` answers."""
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


def experiment_id(c: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name`` in the store at ``uri``, created when missing."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if scheme(uri) == "sqlite":
        ensure_sqlite(uri, name)
        return c.get_experiment_by_name(name).experiment_id
    try:
        return c.create_experiment(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(name).experiment_id
