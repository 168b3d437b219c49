"""The exported projector: a folder that is all a downstream user needs.

    projector.safetensors   projector weights (fp32)
    centers.safetensors     per-level centers of normal residuals
    spec.json               backbone (name, levels, weights source, normalisation, grid),
                            projector hyper-parameters, provenance

:func:`load_feature_extractor` turns such a folder into an object that maps images (and
a few normal reference images of the same product) to raw, residual or projected features.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load, save_file

from pipeline import devices, levels
from pipeline.config import BackboneSpec, ProjectorSpec
from shards.errors import UserError

SPEC_FILE = "spec.json"
PROJECTOR_FILE = "projector.safetensors"
CENTERS_FILE = "centers.safetensors"
REGISTERED_FILE = "registered.json"  # name and version in the registry, once registered
FILES = (SPEC_FILE, PROJECTOR_FILE, CENTERS_FILE)  # what an exported folder holds
FORMAT = 1


def save_export(folder: str, projector_state: dict[str, torch.Tensor], centers: list[torch.Tensor],
                backbone, backbone_spec: BackboneSpec, projector_spec: ProjectorSpec, provenance: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    _write_projector(folder, projector_state)
    save_file(levels.by_name([c.detach().float().cpu().contiguous() for c in centers]), os.path.join(folder, CENTERS_FILE))
    spec = {
        "format": FORMAT,
        "backbone": backbone_spec.model_dump(mode="json"),
        "backbone_id": backbone.id,
        "widths": list(backbone.widths),
        "grid": backbone.grid,
        "image_size": backbone.image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "random_weights": bool(backbone.random_weights),
        "weights": backbone.weights_desc,
        "weights_sha256": backbone.weights_sha256,
        "projector": projector_spec.model_dump(mode="json"),
        "provenance": provenance,
    }
    _write_spec(folder, spec)
    return folder


def derive_export(source: str, folder: str, projector_state: dict[str, torch.Tensor], provenance: dict) -> str:
    """An export of other weights of the same projector (a training checkpoint of the run that made
    the export in ``source``): the centers and spec of ``source``, ``provenance`` in place of its own.
    Never registered: the folder has no ``registered.json``."""
    spec = read_spec(source)
    os.makedirs(folder, exist_ok=True)
    _write_projector(folder, projector_state)
    shutil.copyfile(os.path.join(source, CENTERS_FILE), os.path.join(folder, CENTERS_FILE))
    _write_spec(folder, {**spec, "provenance": provenance})
    return folder


def _write_projector(folder: str, projector_state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in projector_state.items()},
              os.path.join(folder, PROJECTOR_FILE))


def _write_spec(folder: str, spec: dict) -> None:
    """``spec.json``, written last and atomically: a folder with it is a complete export."""
    tmp = os.path.join(folder, SPEC_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, SPEC_FILE))


def registration(folder: str) -> dict | None:
    """``registered.json`` of an exported folder: name, version and the tracking store (its URI,
    credentials masked; absent in folders registered before it was recorded); None before registration."""
    path = os.path.join(folder, REGISTERED_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def registered_as(folder: str) -> tuple[str | None, str | None]:
    """(name, version) in the registry of an exported folder; (None, None) before registration."""
    r = registration(folder)
    return (None, None) if r is None else (r.get("name"), str(r.get("version")))


def read_spec(folder: str) -> dict:
    path = os.path.join(folder, SPEC_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{folder!r} is not an exported projector: {SPEC_FILE} is missing")
    with open(path, "rb") as f:
        return _parse_spec(f.read(), path)


def _parse_spec(text: bytes, where: str) -> dict:
    spec = json.loads(text)
    if spec.get("format") != FORMAT:
        raise UserError(f"{where}: export format {spec.get('format')!r} is not supported (expected {FORMAT})")
    return spec


def read_files(folder: str) -> dict[str, bytes]:
    """The bytes of every file of the export in ``folder`` (:data:`FILES`)."""
    files = {}
    for name in FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"{folder!r} is not an exported projector: {name} is missing")
        with open(path, "rb") as f:
            files[name] = f.read()
    return files


@dataclass
class ADFeatures:
    """Frozen backbone + residual matching + projector, for downstream use.

    ``images`` and ``refs`` are float tensors (N, 3, S, S) in [0, 1] at the backbone's
    image size (see pipeline.transforms.image_to_tensor), on any device: they are moved to
    ``device``, where the backbone, projector and centers live. Outputs are per level
    (N, C, h, w) on ``device``.
    """

    backbone: torch.nn.Module
    projector: torch.nn.Module
    centers: list[torch.Tensor]
    spec: dict
    device: torch.device = devices.CPU
    match_chunk: int = 4096

    def _encode(self, x01: torch.Tensor) -> list[torch.Tensor]:
        from pipeline.transforms import normalize

        return self.backbone(normalize(x01.to(self.device), self.backbone.mean, self.backbone.std))

    def bank(self, refs: torch.Tensor) -> list[torch.Tensor]:
        """Reference bank per level, (1, K*h*w, C), from K normal reference images."""
        return [f.permute(0, 2, 3, 1).reshape(1, -1, f.shape[1]) for f in self._encode(refs)]

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self._encode(images)

    @torch.no_grad()
    def residual(self, images: torch.Tensor, bank: list[torch.Tensor]) -> list[torch.Tensor]:
        from pipeline.matching import match_residual

        return [match_residual(f, b.to(self.device), self.match_chunk) for f, b in zip(self._encode(images), bank)]

    @torch.no_grad()
    def features(self, images: torch.Tensor, refs: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """Projected residual features (the pretrained representation)."""
        bank = self.bank(refs) if isinstance(refs, torch.Tensor) else refs
        return self.projector(self.residual(images, bank))


def load_feature_extractor(folder: str, device: str | torch.device = "cpu") -> ADFeatures:
    """The exported projector in ``folder`` with its backbone, on ``device``: ``"cpu"``, ``"cuda"``
    (the current CUDA device), ``"auto"`` (CUDA when present), or any ``torch.device``."""
    return extractor_from_files(read_files(folder), device, folder)


def extractor_from_files(files: dict[str, bytes], device: str | torch.device = "cpu",
                         where: str = "export") -> ADFeatures:
    """:func:`load_feature_extractor` of an export held in memory (:func:`read_files`); ``where``
    names it in errors. Nothing is written to disk."""
    from pipeline.backbone import build_backbone
    from pipeline.projector import Projector

    if isinstance(device, str) and device in ("auto", "cpu", "cuda"):
        device = devices.resolve(device)
    device = torch.device(device)
    devices.require_cuda(device.type == "cuda", f"device {str(device)!r}")
    spec = _parse_spec(files[SPEC_FILE], os.path.join(where, SPEC_FILE))
    backbone = build_backbone(BackboneSpec.model_validate(spec["backbone"])).to(device)
    if spec.get("weights_sha256") and backbone.weights_sha256 and spec["weights_sha256"] != backbone.weights_sha256:
        raise UserError(
            f"{where}: the projector was trained on backbone weights {spec['weights_sha256'][:12]} but the "
            f"weights found here are {backbone.weights_sha256[:12]}; use the same weights file"
        )
    projector = Projector.from_spec(spec["widths"], ProjectorSpec.model_validate(spec["projector"]))
    projector.load_state_dict(load(files[PROJECTOR_FILE]))
    projector.eval().to(device)
    centers = [c.to(device) for c in levels.in_order(load(files[CENTERS_FILE]))]
    return ADFeatures(backbone, projector, centers, spec, device)
