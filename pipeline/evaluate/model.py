"""Which exported projector an evaluation scores: a registered model, an export folder, or the
export of the config's own pretraining run; and, when known, its registered name and version."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.export import SPEC_FILE, registration
from pipeline.paths import export_dir
from shards.errors import UserError
from shards.storage import mask_secrets

log = logging.getLogger(__name__)


@dataclass
class ModelRef:
    folder: str
    label: str  # how the result names the model
    name: str | None = None  # registered model name and version, when known
    version: str | None = None


def resolve_model(cfg: Config, model: str | None, checkpoint: str | None) -> ModelRef:
    """The export folder to evaluate: a registry URI, an export folder, or the config's own run."""
    if model and checkpoint:
        raise UserError("pass either a model URI or a checkpoint folder, not both")
    if model:
        return _registered(cfg, model)
    folder = checkpoint or export_dir(cfg)
    if not os.path.isfile(os.path.join(folder, SPEC_FILE)):
        if checkpoint:
            raise UserError(f"--checkpoint {checkpoint!r} is not an exported projector folder (no spec.json there)")
        raise UserError(f"no exported model of run {cfg.name!r} at {folder}: run `adpretrain pretrain CONFIG` "
                        "first or pass --model models:/NAME@champion (or --checkpoint EXPORT_FOLDER)")
    return ModelRef(os.path.abspath(folder), os.path.abspath(folder), *_registered_here(cfg, folder))


def _registered_here(cfg: Config, folder: str) -> tuple[str | None, str | None]:
    """The registered (name, version) of an export folder, when it was registered in this config's
    tracking store; a version of another store (a folder copied from elsewhere) is not decided on."""
    from pipeline.tracking import resolve_uri

    r = registration(folder)
    if r is None:
        return None, None
    here = mask_secrets(resolve_uri(cfg.tracking.uri))
    if r.get("tracking_uri", here) != here:
        log.warning("%s was registered as %s version %s in another tracking store (%s, not %s): it is evaluated "
                    "as an unregistered export, and no alias is moved", folder, r.get("name"), r.get("version"),
                    r["tracking_uri"], here)
        return None, None
    return r.get("name"), str(r.get("version"))


def _registered(cfg: Config, model: str) -> ModelRef:
    """A model URI: its downloaded export and, for a models:/ URI, its name and version (the
    label names the version an alias points to)."""
    from pipeline.tracking import load_registered, model_version, resolve_uri

    uri = resolve_uri(cfg.tracking.uri)
    folder = load_registered(model, tracking_uri=uri)
    found = model_version(model, uri)
    if found is None:
        return ModelRef(folder, model)
    name, version = found
    label = f"{model} (version {version})" if "@" in model else model
    return ModelRef(folder, label, name, version)
