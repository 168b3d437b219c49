"""Features of every kind from one code path, for one class at a time.

The exported projector travels to every task as its files' bytes (:class:`ExportBlob`) and
is loaded once per process. The backbone runs once per batch: ``raw`` is its output,
``residual`` matches it against the bank of the class's K references, ``pretrained`` runs
the projector on the residual. Features are computed on the task's device and returned on
the CPU, with what the rest of the evaluation needs about the class (:class:`ClassInfo`); for a
class of a ``split: val`` source, that includes the patch values of the diagnosis
(:mod:`pipeline.evaluate.diagnosis`), computed here from the same features.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.config import KINDS
from pipeline.evaluate.diagnosis import Values, class_values, split_patches
from pipeline.evaluate.plan import ClassPlan, ShardImages, select_images
from pipeline.evaluate.threads import computing_on
from pipeline.export import FILES, extractor_from_files, read_files

PICTURES_PER_CLASS = 4
BATCH = 16  # images per backbone / predict batch


@dataclass(frozen=True)
class ExportBlob:
    """The exported projector's files as bytes, so tasks on any node can load it."""

    digest: str
    files: dict[str, bytes]

    @classmethod
    def read(cls, folder: str) -> "ExportBlob":
        files = read_files(folder)
        h = hashlib.sha256()
        for name in FILES:
            h.update(hashlib.sha256(files[name]).digest())
        return cls(h.hexdigest(), files)


_extractors: dict[tuple[str, torch.device], Any] = {}


def _extractor(blob: ExportBlob, device: torch.device):
    """The feature extractor of ``blob`` on ``device``, loaded once per process."""
    if (blob.digest, device) not in _extractors:
        _extractors.clear()
        _extractors[blob.digest, device] = extractor_from_files(blob.files, device, f"export {blob.digest[:12]}")
    return _extractors[blob.digest, device]


@torch.no_grad()
def kind_features(fx, images01: torch.Tensor, bank: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """All three kinds from one backbone pass: raw, residual against ``bank``, projected residual."""
    from pipeline.matching import match_residual

    raw = fx.raw(images01)
    res = [match_residual(f, b, fx.match_chunk) for f, b in zip(raw, bank)]
    return {"raw": raw, "residual": res, "pretrained": list(fx.projector(res))}


def _batched(fx, images_u8: torch.Tensor, bank: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Features of every kind of 8-bit images, batch by batch on the extractor's device, returned on the CPU."""
    parts: dict[str, list[list[torch.Tensor]]] = {k: [] for k in KINDS}
    for i in range(0, images_u8.shape[0], BATCH):
        x = images_u8[i : i + BATCH].to(fx.device).float().div_(255.0)
        for k, feats in kind_features(fx, x, bank).items():
            parts[k].append([f.cpu() for f in feats])
    return {k: [torch.cat(level) for level in zip(*v)] for k, v in parts.items()}


@dataclass
class ClassInfo:
    """Everything about one class except its features: targets, references, pictures, norms,
    and on val sources the patch values of the diagnosis."""

    source: str
    role: str
    cls: str
    refs: list[str]
    n_fit: int
    test_keys: list[str]
    labels: np.ndarray
    masks: np.ndarray | None  # None: pixel metrics not available
    pictures: list[int]  # indices into the test images
    picture_images: np.ndarray  # (P, 3, S, S) float [0, 1]
    picture_masks: np.ndarray | None
    norms: dict[str, dict[str, np.ndarray]]  # kind -> normal/abnormal patch scores
    diagnosis: Values | None  # val classes only: patch values of pipeline.evaluate.diagnosis
    size: int
    seconds: float


def _picture_indices(labels: np.ndarray, n: int = PICTURES_PER_CLASS) -> list[int]:
    abn = [int(i) for i in np.flatnonzero(labels == 1)]
    nor = [int(i) for i in np.flatnonzero(labels == 0)]
    take = abn[: max(n - 1, n - len(nor))]
    return sorted(take + nor[: n - len(take)])


def _patch_norms(feats: list[torch.Tensor], labels: np.ndarray, masks: np.ndarray | None) -> dict[str, np.ndarray]:
    """Patch scores sqrt(||e||+1)-1 (mean over levels) of normal and abnormal test patches.
    Abnormal images without a mask are left out (their patches cannot be labelled)."""
    from pipeline.evaluate.featurenorm import norm_score

    return split_patches(torch.stack([norm_score(f) for f in feats]).mean(0), labels, masks)


def class_features(blob: ExportBlob, plan: ClassPlan, kinds: Sequence[str], device: torch.device,
                   *shards: ShardImages) -> tuple:
    """Features of ``kinds`` for one class, computed on ``device``: returns
    (*[(fit, test) per kind], ClassInfo), features on the CPU."""
    start = time.perf_counter()
    data = select_images(plan, shards)
    with computing_on(device):
        fx = _extractor(blob, device)
        bank = fx.bank(data.ref_images)
        fit = _batched(fx, data.fit_images, bank)
        test = _batched(fx, data.test_images, bank)
        masks = data.masks if data.pixel_ok else None
        diagnosis = class_values(fit, test, data.labels, masks, device) if plan.role == "val" else None
    pics = _picture_indices(data.labels)
    info = ClassInfo(
        source=plan.source, role=plan.role, cls=plan.cls, refs=data.refs, n_fit=int(data.fit_images.shape[0]),
        test_keys=data.test_keys, labels=data.labels, masks=masks, pictures=pics,
        picture_images=data.test_images[pics].float().div_(255.0).numpy(),
        picture_masks=None if masks is None else masks[pics],
        norms={k: _patch_norms(test[k], data.labels, masks) for k in ("residual", "pretrained")},
        diagnosis=diagnosis,
        size=int(data.test_images.shape[-1]), seconds=time.perf_counter() - start,
    )
    return (*[(fit[k], test[k]) for k in kinds], info)

