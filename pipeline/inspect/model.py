"""What `--model` names, and where the work runs (`--device`).

``--model`` is a registry URI (``models:/NAME@alias``, ``models:/NAME/3``, also ``runs:/RUN/projector``),
resolved through :mod:`pipeline.tracking` with the tracking URI of ``--tracking-uri`` or
MLFLOW_TRACKING_URI, or an export folder (``spec.json``, ``projector.safetensors``,
``centers.safetensors``). A training checkpoint is not a model: it holds the projector weights
only (no backbone spec, no centers), and the project makes a model of it at the end of
pretraining (the export, registered as a version); a checkpoint folder is refused with a message
saying so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from pipeline import devices
from pipeline.export import PROJECTOR_FILE, SPEC_FILE, registered_as
from pipeline.inspect.state import export_digest
from shards.errors import UserError

_URI = re.compile(r"^(models|runs):/")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ModelRef:
    folder: str  # the export folder (downloaded for a registry URI)
    label: str  # what the user passed (and, for an alias, the version it points to)
    name: str | None
    version: str | None
    digest: str

    def info(self) -> dict:
        return {"label": self.label, "name": self.name, "version": self.version, "digest": self.digest}


def tracking_uri(given: str | None) -> str:
    """``--tracking-uri``, else MLFLOW_TRACKING_URI, else the default store (sqlite:///mlflow.db)."""
    from pipeline.config import TrackingSpec
    from pipeline.tracking import resolve_uri

    return resolve_uri(given or os.environ.get("MLFLOW_TRACKING_URI") or TrackingSpec().uri)


def _registered(model: str, given_uri: str | None) -> ModelRef:
    from pipeline.tracking import load_registered, model_version

    uri = tracking_uri(given_uri)
    folder = load_registered(model, tracking_uri=uri)
    found = model_version(model, uri)
    name, version = found if found else (None, None)
    label = f"{model} (version {version})" if found and "@" in model else model
    return ModelRef(folder, label, name, version, export_digest(folder))


def _folder(model: str) -> ModelRef:
    if os.path.isfile(os.path.join(model, SPEC_FILE)):
        name, version = registered_as(model)
        folder = os.path.abspath(model)
        return ModelRef(folder, folder, name, version, export_digest(folder))
    if os.path.isfile(os.path.join(model, PROJECTOR_FILE)) or model.endswith(".safetensors"):
        raise UserError(
            f"--model {model!r} looks like a training checkpoint (projector weights without {SPEC_FILE}): a "
            "checkpoint holds no backbone spec and no centers, so it cannot be loaded as a model. Pass the run's "
            "export folder (WORKDIR/<run name>/export, written at the end of `adpretrain pretrain`) or its "
            "registered version (models:/NAME@champion)"
        )
    raise UserError(f"--model {model!r} is neither a registry URI (models:/NAME@alias, models:/NAME/3) nor an "
                    f"exported model folder (no {SPEC_FILE} there)")


def resolve_model(model: str, given_uri: str | None = None) -> ModelRef:
    """The export folder ``model`` names, with its label, registered version and digest."""
    if _URI.match(model):
        return _registered(model, given_uri)
    if given_uri:
        raise UserError(f"--tracking-uri is for registry URIs; --model {model!r} is a folder")
    return _folder(model)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when torch has it, else the CPU), ``cpu``, ``cuda`` (torch's current CUDA
    device) or ``cuda:N`` (that one); a CUDA device this machine lacks is a :class:`UserError`."""
    if not _DEVICE.match(name):
        raise UserError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if name in ("auto", "cpu"):
        return devices.resolve(name)
    if not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for a CUDA GPU, but torch sees none here (torch.cuda.is_available() "
                        "is False); use --device cpu (or auto), or run on a machine with a GPU")
    if name == "cuda":
        return devices.resolve("cuda")
    index = int(name.split(":")[1])
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); pick one of them or use --device cuda")
    return torch.device("cuda", index)
