"""The model registry: versions, the champion/challenger aliases, and getting a model back.

Model URIs: ``models:/NAME@alias`` and ``models:/NAME/3`` name a registered version
(:func:`model_version`); ``runs:/RUN/projector`` and ``models:/<model id>`` a logged model.
:func:`load_registered` downloads any of them into a local cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingSpec, resolve_uri
from pipeline.export import SPEC_FILE
from pipeline.tracking.pyfunc import MODEL_ARTIFACT
from pipeline.tracking.store import connect
from shards.errors import UserError
from shards.storage import mask_secrets

log = logging.getLogger(__name__)

VAL_TAG_PREFIX = "adpretrain.val."
CHAMPION, CHALLENGER = "champion", "challenger"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def ensure_registered_model(c: MlflowClient, name: str) -> None:
    """Create the registered model ``name`` unless it exists."""
    try:
        c.create_registered_model(name, description="ADPretrain projector: residual features -> "
                                                    "anomaly representation (pyfunc feature extractor)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def model_version(model_uri: str, tracking_uri: str) -> tuple[str, str] | None:
    """(name, version) of the registered version ``models:/NAME@alias`` or ``models:/NAME/N``
    points to; None for any other model URI. :class:`UserError` when the registry at
    ``tracking_uri`` has no such version."""
    m = _MODELS_URI.match(model_uri)
    if m is None:
        return None
    uri = resolve_uri(tracking_uri)
    c = connect(uri)
    try:
        mv = (c.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
              else c.get_model_version(m["name"], m["version"]))
    except MlflowException as e:
        held = _registered_versions(c, m["name"])
        if m["alias"] == CHAMPION and held.startswith("; " + m["name"]):
            held += (f" (a run whose version the model selection kept back, by its gate or a better champion, "
                     f"ends with @{CHALLENGER}: use models:/{m['name']}@{CHALLENGER} or models:/{m['name']}/N)")
        raise _not_found(model_uri, uri, e, held) from None
    return m["name"], str(mv.version)


def _registered_versions(c: MlflowClient, name: str) -> str:
    """What the registry holds of ``name``, for an error message: its versions and their aliases."""
    try:
        versions = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
        aliases = c.get_registered_model(name).aliases if versions else {}
    except MlflowException:
        return ""
    if not versions:
        return f"; the registry has no version of {name}"
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append("@" + alias)
    listed = ", ".join(" ".join([str(v), *sorted(by_version.get(str(v), []))]) for v in versions)
    return f"; {name} has versions {listed}"


def _not_found(model_uri: str, uri: str, e: MlflowException, held: str = "") -> UserError:
    return UserError(mask_secrets(f"model {model_uri} not found in the registry at {uri}: {e.message.rstrip('.')}{held}", uri))


def select_champion(spec: TrackingSpec, version: str, metric_name: str, value: float,
                    higher_is_better: bool = True, gate_failed: list[str] = ()) -> dict:
    """Move alias ``champion`` to ``version`` when ``value`` beats the current champion's and
    no comparison of the no-regression gate failed (``gate_failed``), else set ``challenger``.
    Values are stored as the version tag ``adpretrain.val.<metric_name>``.

    Returns {decision, new_value, champion_value, version, previous_champion, gate_failed}; the
    decision and both numbers are also tagged on the version and logged into its training run.
    """
    if not math.isfinite(value):
        raise UserError(f"validation metric {metric_name} of version {version} is {value}: cannot rank it")
    uri = resolve_uri(spec.uri)
    c = connect(uri)
    name, tag = spec.model_name, VAL_TAG_PREFIX + metric_name
    try:
        mv = c.get_model_version(name, str(version))
        result = _decide(c, name, tag, str(version), float(value), higher_is_better)
        if gate_failed:
            result["decision"] = CHALLENGER
        result["gate_failed"] = list(gate_failed)
        c.set_model_version_tag(name, str(version), tag, repr(float(value)))
        c.set_model_version_tag(name, str(version), "adpretrain.selection", json.dumps(result))
        c.set_registered_model_alias(name, result["decision"], str(version))
    except MlflowException as e:
        raise UserError(mask_secrets(
            f"model selection for {name} version {version} at {uri} failed: {e.message}", uri)) from None
    log.info("model selection on %s: %s v%s = %.6g vs champion %s = %s -> %s", metric_name, name, version, value,
             result["previous_champion"], result["champion_value"], result["decision"])
    if mv.run_id:
        _record_in_run(c, mv.run_id, metric_name, result, uri)
    return result


def _decide(c: MlflowClient, name: str, tag: str, version: str, value: float, higher_is_better: bool) -> dict:
    """Champion or challenger: ``value`` against the value tagged on the current champion."""
    try:
        champ = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        champ = None
    champion_value = float(champ.tags[tag]) if champ is not None and tag in champ.tags else None
    previous = str(champ.version) if champ is not None else None
    if champ is None or previous == version:
        decision = CHAMPION
    elif champion_value is None:
        log.warning("champion %s v%s has no %s: promoting v%s", name, previous, tag, version)
        decision = CHAMPION
    else:
        better = value > champion_value if higher_is_better else value < champion_value
        decision = CHAMPION if better else CHALLENGER
    return {"decision": decision, "new_value": value, "champion_value": champion_value, "version": version,
            "previous_champion": previous}


def _record_in_run(c: MlflowClient, run_id: str, metric_name: str, result: dict, uri: str) -> None:
    """The selection's numbers as metrics of the version's training run, the decision as its tag."""
    ts = int(time.time() * 1000)
    metrics = [Metric(f"val/{metric_name}", result["new_value"], ts, 0)]
    if result["champion_value"] is not None:
        metrics.append(Metric(f"val/{metric_name}/champion", result["champion_value"], ts, 0))
    try:
        c.log_batch(run_id, metrics=metrics, tags=[RunTag("adpretrain.selection", json.dumps(result))])
    except MlflowException as e:
        log.warning("model selection: could not record the decision in run %s: %s", run_id,
                    mask_secrets(e.message, uri))


def load_registered(model_uri: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> str:
    """Download a registered (``models:/NAME@alias``, ``models:/NAME/3``) or logged
    (``runs:/RUN/projector``, ``models:/<model id>``) model; return the local folder of the
    exported projector (``projector.safetensors``, ``centers.safetensors``, ``spec.json``).

    ``tracking_uri`` defaults to MLFLOW_TRACKING_URI, else sqlite:///mlflow.db. Downloads of
    registry versions are cached under ``cache_dir`` (default ~/.cache/adpretrain/models).
    """
    uri = resolve_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or TrackingSpec().uri)
    source, key = model_uri, f"uri-{hashlib.sha256(model_uri.encode()).hexdigest()[:16]}"
    # resolved here: MLflow's models:/ resolution reads the process-wide registry URI
    found = model_version(model_uri, uri)
    if found is not None:
        name, version = found
        try:
            source = connect(uri).get_model_version_download_uri(name, version)
        except MlflowException as e:
            raise _not_found(model_uri, uri, e) from None
        key = f"{name}-v{version}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    cache = Path(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "adpretrain", "models"))
    folder = cache / key / "data" / MODEL_ARTIFACT
    if not (folder / SPEC_FILE).is_file():
        _download(model_uri, source, uri, cache, cache / key)
    return str(folder)


def _download(model_uri: str, source: str, uri: str, cache: Path, target: Path) -> None:
    """Download the model at ``source`` into ``target`` (atomic: the cache never holds a partial model)."""
    cache.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=cache)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri,
                                                    registry_uri=uri)
        if not (Path(local) / "data" / MODEL_ARTIFACT / SPEC_FILE).is_file():
            raise UserError(f"model {model_uri} is not an adpretrain projector (no data/{MODEL_ARTIFACT}/spec.json)")
        try:
            os.replace(local, target)
        except OSError:  # another process finished the same download first
            pass
    except (MlflowException, OSError) as e:
        raise UserError(mask_secrets(f"cannot download model {model_uri} from {uri}: {e}", uri)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
