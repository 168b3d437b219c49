"""Which exported projector an evaluation scores: a registered model, an export folder, or the
export of the config's own pretraining run; and, when known, its registered name and version."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.export import SPEC_FILE, registered_as
from pipeline.paths import export_dir
from shards.errors import UserError


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
    name, version = registered_as(folder)
    return ModelRef(os.path.abspath(folder), os.path.abspath(folder), name, version)


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
