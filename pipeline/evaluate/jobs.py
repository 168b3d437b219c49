"""Downstream evaluation jobs: raw vs residual vs pretrained features, per dataset and class.

For every ``split: eval`` and ``split: val`` source and each of its classes:

1. its shards are checked against the manifest (sizes, before any task starts) and decoded
   once, whole (one task per shard): a shard that cannot be read whole is an error, never
   a class evaluated on part of its images;
2. a fixed, seeded K-shot reference set is drawn from the class's normal training images
   (the K with the smallest seeded hash of their key: independent of shard order), the
   other normal training images are the fit set, the test images are the rest (capped by
   ``eval.max_test_images``, abnormal and normal kept in proportion);
3. features of every kind come from one code path: the backbone runs once, ``raw`` is its
   output, ``residual`` matches it against the bank of the K references, ``pretrained``
   runs the projector on the residual (one task per class);
4. one task per (dataset, class, method, kind) fits the method on the fit set and scores
   the test images; image metrics always, pixel metrics only when every abnormal test
   image has a mask (otherwise None, reported as n/a, never 0).

With ``parallel=True`` these are Ray tasks (features shared through the object store);
``parallel=False`` runs the same functions in-process. Every task on the CPU computes with
one thread, so both give identical numbers.

Devices (``eval.device``): on CUDA the feature tasks (backbone, residual matching,
projector) and the method tasks (FeatureNorm, PaDiM, PatchCore's aggregation and coreset
selection) run on a GPU, each Ray task asking for ``eval.gpus_per_task`` of one and taking
the device Ray gave it (pipeline.devices.task_device); PatchCore's nearest-neighbour search
(faiss), the shard decoding and the metrics stay on the CPU. Features travel between tasks
as CPU tensors.

Results: a table (list of dict rows: per class, and the mean over classes per
dataset/method/kind) written as CSV and Markdown with the pictures under
``{workdir}/{name}/{eval.out}/``, an MLflow evaluation run (a child of the pretraining run
when that run is in the store), and, for a registered model version, the champion decision
computed on the ``split: val`` sources only.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline import devices
from pipeline.config import KINDS, Config, EvalSpec
from pipeline.data import rank_key
from shards.spec import SourceSpec
from shards.errors import DataError, UserError
from pipeline.rayctx import cluster_address
from shards.storage import mask_secrets
from pipeline.evaluate.patchcore import one_thread

log = logging.getLogger(__name__)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
METRICS = IMAGE_METRICS + PIXEL_METRICS
PICTURES_PER_CLASS = 4
BATCH = 16  # images per backbone / predict batch
NORMAL_SPLITS = ("train", "validation")  # original splits whose normal images are training images
EXPORT_FILES = ("spec.json", "projector.safetensors", "centers.safetensors")
NA = "n/a"


# ----------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """What an evaluation produced: the table rows, where the files went, the selection."""

    rows: list[dict[str, Any]]
    out_dir: str
    files: dict[str, str]
    references: dict[str, list[str]]
    model: str
    selection: dict | None = None
    run_id: str | None = None
    tracking_uri: str = ""

    def table_markdown(self, per_class: bool = False) -> str:
        """The means per dataset/method/kind (and every class with ``per_class``) as Markdown."""
        return markdown_table(self.rows if per_class else [r for r in self.rows if r["class"] == "mean"])

    def describe(self) -> str:
        lines = [f"evaluation of {self.model}", "", self.table_markdown(), ""]
        lines.append(f"  per-class results  {self.files['csv']}")
        lines.append(f"  table (Markdown)   {self.files['markdown']}")
        lines.append(f"  pictures           {self.files['pictures']}")
        if self.run_id:
            lines.append(f"  MLflow run         {self.run_id} ({self.tracking_uri})")
        s = self.selection
        if s is not None:
            champ = "none" if s.get("champion_value") is None else f"{s['champion_value']:.4f}"
            if s.get("decision"):
                lines.append(f"  model selection    {s['metric']} on val = {s['new_value']:.4f} vs champion "
                             f"{champ}: version {s['version']} -> {s['decision']}")
            else:
                lines.append(f"  model selection    {s['metric']} on val = {s['new_value']:.4f} "
                             f"(no registered version: no decision)")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return NA
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["split", "source", "class", "method", "kind", *METRICS]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" if i < 5 else "---:" for i in range(len(head))) + " |"]
    out += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(out)


def csv_text(rows: list[dict[str, Any]]) -> str:
    head = ["split", "source", "class", "method", "kind", *METRICS, "n_fit", "n_test", "n_test_abnormal"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in rows:
        w.writerow([NA if r.get(h) is None else (repr(r[h]) if isinstance(r[h], float) else r[h]) for h in head])
    return buf.getvalue()


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (split, source, method, kind): the mean over classes of every metric (None when no
    class has it; classes without it are left out of that mean)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["split"], r["source"], r["method"], r["kind"]), []).append(r)
    out = []
    for (split, source, method, kind), rs in groups.items():
        row: dict[str, Any] = {"split": split, "source": source, "class": "mean", "method": method, "kind": kind}
        for m in METRICS:
            vals = [r[m] for r in rs if r[m] is not None]
            row[m] = float(np.mean(vals)) if vals else None
        for n in ("n_fit", "n_test", "n_test_abnormal"):
            row[n] = sum(r[n] for r in rs)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- data


@dataclass
class ShardImages:
    """One decoded shard (numpy, so Ray shares it without copies)."""

    keys: list[str]
    classes: list[str]
    splits: list[str]
    labels: np.ndarray  # (n,) int8
    has_mask: np.ndarray  # (n,) bool
    images: np.ndarray  # (n, 3, S, S) uint8
    masks: np.ndarray  # (n, S, S) bool


def decode_shard(url: str, count: int, size: int) -> ShardImages:
    """Decode every sample of one shard at ``size``; the manifest gives it ``count`` samples.

    A shard that cannot be read whole (a corrupt sample, a broken tar, fewer samples than
    the manifest's) is a DataError naming it: a class is never evaluated on part of its
    images. Images are kept as 8-bit values of the resized image, a quarter of the memory
    of float32."""
    from pipeline.data import iter_decoded

    keys, classes, splits, labels, has_mask, images, masks = [], [], [], [], [], [], []
    with one_thread():
        for d in iter_decoded([url], size, strict=True, expect={url: count}):
            keys.append(d.key)
            classes.append(str(d.meta["class"]))
            splits.append(str(d.meta["split"]))
            labels.append(int(d.meta["label"]))
            has_mask.append(bool(d.meta.get("has_mask", False)))
            images.append(d.image.mul(255.0).round_().to(torch.uint8).numpy())
            masks.append(d.mask.numpy())
    return ShardImages(
        keys, classes, splits, np.asarray(labels, dtype=np.int8), np.asarray(has_mask, dtype=bool),
        np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
        np.stack(masks) if masks else np.zeros((0, size, size), bool),
    )


@dataclass(frozen=True)
class ClassPlan:
    """One class of one source, and how to pick its images."""

    source: str
    role: str  # eval | val
    cls: str
    masks: bool  # False for `masks: none` sources
    k_shot: int
    seed: int
    max_test: int | None


@dataclass
class ClassImages:
    refs: list[str]
    ref_images: torch.Tensor  # (K, 3, S, S) float [0, 1]
    fit_images: torch.Tensor  # (N_fit, 3, S, S) uint8
    test_keys: list[str]
    test_images: torch.Tensor  # (N_test, 3, S, S) uint8
    labels: np.ndarray  # (N_test,)
    masks: np.ndarray  # (N_test, S, S) bool
    pixel_ok: bool


def select_images(plan: ClassPlan, shards: Sequence[ShardImages]) -> ClassImages:
    """References, fit set and test set of ``plan.cls`` from the decoded shards of its source."""
    items = [(rank_key(plan.seed, s.keys[i]), si, i) for si, s in enumerate(shards)
             for i in range(len(s.keys)) if s.classes[i] == plan.cls]
    items.sort()
    normal_train = [t for t in items if shards[t[1]].splits[t[2]] in NORMAL_SPLITS and shards[t[1]].labels[t[2]] == 0]
    test = [t for t in items if shards[t[1]].splits[t[2]] == "test"]
    where = f"source {plan.source!r}, class {plan.cls!r}"
    if len(normal_train) < plan.k_shot + 1:
        raise DataError(
            f"{where}: {len(normal_train)} normal training images, but eval.k_shot={plan.k_shot} references "
            "plus at least one image to fit the methods are needed; lower eval.k_shot or add normal images"
        )
    labels_all = [int(shards[si].labels[i]) for _, si, i in test]
    if not any(labels_all) or all(labels_all):
        raise DataError(f"{where}: the test images must hold both normal and abnormal images "
                        f"({sum(labels_all)} abnormal of {len(test)})")
    if plan.max_test is not None and len(test) > plan.max_test:
        abn = [t for t, y in zip(test, labels_all) if y]
        nor = [t for t, y in zip(test, labels_all) if not y]
        n_abn = min(len(abn), max(1, round(plan.max_test * len(abn) / len(test))), plan.max_test - 1)
        test = abn[:n_abn] + nor[: plan.max_test - n_abn]
    refs, fit = normal_train[: plan.k_shot], normal_train[plan.k_shot :]
    by_key = lambda ts: sorted(ts, key=lambda t: shards[t[1]].keys[t[2]])  # noqa: E731
    refs, fit, test = by_key(refs), by_key(fit), by_key(test)

    def stack(ts: list, attr: str) -> np.ndarray:
        return np.stack([getattr(shards[si], attr)[i] for _, si, i in ts])

    labels = np.asarray([int(shards[si].labels[i]) for _, si, i in test], dtype=np.int64)
    has_mask = np.asarray([bool(shards[si].has_mask[i]) for _, si, i in test])
    pixel_ok = plan.masks and bool(has_mask[labels == 1].all())
    if plan.masks and not pixel_ok:
        log.warning("%s: %d of %d abnormal test images have no mask: pixel metrics are n/a", where,
                    int((~has_mask[labels == 1]).sum()), int((labels == 1).sum()))
    return ClassImages(
        refs=[shards[si].keys[i] for _, si, i in refs],
        ref_images=torch.from_numpy(stack(refs, "images")).float().div_(255.0),
        fit_images=torch.from_numpy(stack(fit, "images")),
        test_keys=[shards[si].keys[i] for _, si, i in test],
        test_images=torch.from_numpy(stack(test, "images")),
        labels=labels,
        masks=stack(test, "masks"),
        pixel_ok=pixel_ok,
    )


# ----------------------------------------------------------------------------- features


@dataclass(frozen=True)
class ExportBlob:
    """The exported projector's files as bytes, so tasks on any node can load it."""

    digest: str
    files: dict[str, bytes]

    @classmethod
    def read(cls, folder: str) -> "ExportBlob":
        files = {}
        for name in EXPORT_FILES:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise UserError(f"{folder!r} is not an exported projector: {name} is missing")
            with open(path, "rb") as f:
                files[name] = f.read()
        h = hashlib.sha256()
        for name in EXPORT_FILES:
            h.update(hashlib.sha256(files[name]).digest())
        return cls(h.hexdigest(), files)


_extractors: dict[tuple[str, torch.device], Any] = {}


def _extractor(blob: ExportBlob, device: torch.device):
    """The feature extractor of ``blob`` on ``device``, loaded once per process."""
    from pipeline.export import load_feature_extractor

    if (blob.digest, device) not in _extractors:
        folder = os.path.join(tempfile.gettempdir(), f"adpretrain-export-{blob.digest[:16]}")
        if not os.path.isfile(os.path.join(folder, "spec.json")):
            tmp = tempfile.mkdtemp(prefix=".export-", dir=tempfile.gettempdir())
            for name, data in blob.files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process unpacked it first
                shutil.rmtree(tmp, ignore_errors=True)
        _extractors.clear()
        _extractors[blob.digest, device] = load_feature_extractor(folder, device)
    return _extractors[blob.digest, device]


@torch.no_grad()
def kind_features(fx, images01: torch.Tensor, bank: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """All three kinds from one backbone pass: raw, residual against ``bank``, projected residual."""
    from pipeline.residual import match_residual

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
    """Everything about one class except its features: targets, references, pictures, norms."""

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
    from pipeline.transforms import patch_labels

    score = torch.stack([norm_score(f) for f in feats]).mean(0)  # (N, h, w)
    keep = labels == 0 if masks is None else np.ones(len(labels), bool)
    if masks is None:
        abnormal = torch.zeros(score.shape, dtype=torch.bool)
    else:
        abnormal = patch_labels(torch.from_numpy(masks), score.shape[-1], "nearest")
    s, a = score[torch.from_numpy(keep)], abnormal[torch.from_numpy(keep)]
    return {"normal": s[~a].numpy(), "abnormal": s[a].numpy()}


def computing_on(device: torch.device):
    """The context of a computation on ``device``: one thread on the CPU (identical numbers in
    Ray tasks and in-process), nothing to set on a GPU."""
    return one_thread() if device.type == "cpu" else contextlib.nullcontext()


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
    pics = _picture_indices(data.labels)
    info = ClassInfo(
        source=plan.source, role=plan.role, cls=plan.cls, refs=data.refs, n_fit=int(data.fit_images.shape[0]),
        test_keys=data.test_keys, labels=data.labels, masks=masks, pictures=pics,
        picture_images=data.test_images[pics].float().div_(255.0).numpy(),
        picture_masks=None if masks is None else masks[pics],
        norms={k: _patch_norms(test[k], data.labels, masks) for k in ("residual", "pretrained")},
        size=int(data.test_images.shape[-1]), seconds=time.perf_counter() - start,
    )
    return (*[(fit[k], test[k]) for k in kinds], info)


# ----------------------------------------------------------------------------- methods


@dataclass
class Cell:
    """One (dataset, class, method, kind): metrics, image scores, maps of the picture images."""

    source: str
    role: str
    cls: str
    method: str
    kind: str
    metrics: dict[str, float | None]
    scores: np.ndarray
    picture_maps: np.ndarray  # (P, S, S)
    seconds: float


def run_cell(method: str, kind: str, spec: EvalSpec, feats: tuple[list[torch.Tensor], list[torch.Tensor]],
             info: ClassInfo, device: torch.device) -> Cell:
    """Fit ``method`` on the fit features of one kind, predict the test images (on ``device``),
    compute metrics (on the CPU)."""
    from pipeline.evaluate.methods import make_method
    from pipeline.evaluate.metrics import image_metrics, pixel_metrics

    start = time.perf_counter()
    fit, test = feats
    with computing_on(device):
        m = make_method(method, spec).fit([f.to(device) for f in fit])
        maps, scores = [], []
        for i in range(0, test[0].shape[0], BATCH):
            mp, sc = m.predict([f[i : i + BATCH].to(device) for f in test], info.size)
            maps.append(mp.cpu())
            scores.append(sc.cpu())
        maps_t, scores_t = torch.cat(maps), torch.cat(scores)
    if not (torch.isfinite(maps_t).all() and torch.isfinite(scores_t).all()):
        raise DataError(f"{method} on {kind} features of {info.source}/{info.cls} gave non-finite scores")
    metrics = {**image_metrics(scores_t, info.labels), **pixel_metrics(maps_t, info.masks)}
    return Cell(info.source, info.role, info.cls, method, kind, metrics, scores_t.numpy(),
                maps_t[info.pictures].numpy(), time.perf_counter() - start)


# ----------------------------------------------------------------------------- scheduling


def _class_plans(cfg: Config, src: SourceSpec, manifest: dict) -> list[ClassPlan]:
    entry = manifest["sources"].get(src.name)
    if entry is None or entry.get("split") != src.split:
        raise DataError(f"source {src.name!r} (split: {src.split}) is not in the shards at {cfg.shards.url!r}: "
                        "run `adpretrain build-shards CONFIG` again")
    e = cfg.eval
    return [ClassPlan(src.name, src.split, cls, src.masks != "none", e.k_shot, e.seed, e.max_test_images)
            for cls in sorted(entry["classes"])]


Work = list[tuple[SourceSpec, list[tuple[str, int]], list[ClassPlan]]]
"""Per source: its shards (URL, samples the manifest lists) and its classes."""


def _run_sequential(cfg: Config, blob: ExportBlob, work: Work, size: int,
                    progress: bool) -> tuple[list[ClassInfo], list[Cell]]:
    from tqdm import tqdm

    device = devices.resolve(cfg.eval.device)
    log.info("evaluation in-process on %s", device)
    infos, cells = [], []
    kinds, methods = list(cfg.eval.kinds), list(cfg.eval.methods)
    total = sum(len(p) for _, _, p in work) * len(kinds) * len(methods)
    with tqdm(total=total, desc="evaluate", unit="job", disable=not progress) as bar:
        for _, shards_of, plans in work:
            shards = [decode_shard(u, n, size) for u, n in shards_of]
            for plan in plans:
                *per_kind, info = class_features(blob, plan, kinds, device, *shards)
                infos.append(info)
                for kind, feats in zip(kinds, per_kind):
                    for method in methods:
                        cells.append(run_cell(method, kind, cfg.eval, feats, info, device))
                        bar.update()
    return infos, cells


def task_resources(spec: EvalSpec, cluster_gpus: float) -> tuple[bool, dict[str, float]]:
    """Whether the feature and method tasks run on GPUs, and the Ray resources each one asks
    for; ``cluster_gpus``: the GPUs of the Ray cluster (``auto`` uses them when there are any)."""
    use_gpu = spec.device == "cuda" or (spec.device == "auto" and cluster_gpus > 0)
    if use_gpu and cluster_gpus <= 0:
        raise UserError("eval.device is cuda but the Ray cluster has no GPU: start its nodes with GPUs "
                        "(`ray start --num-gpus N`) or set eval.device: cpu")
    return use_gpu, {"num_cpus": 1, "num_gpus": spec.gpus_per_task if use_gpu else 0}


def features_task(use_gpu: bool, blob: ExportBlob, plan: ClassPlan, kinds: Sequence[str],
                  *shards: ShardImages) -> tuple:
    """:func:`class_features` in a Ray task, on the device Ray gave it."""
    return class_features(blob, plan, kinds, devices.task_device(use_gpu), *shards)


def cell_task(use_gpu: bool, method: str, kind: str, spec: EvalSpec,
              feats: tuple[list[torch.Tensor], list[torch.Tensor]], info: ClassInfo) -> Cell:
    """:func:`run_cell` in a Ray task, on the device Ray gave it."""
    return run_cell(method, kind, spec, feats, info, devices.task_device(use_gpu))


def _run_ray(cfg: Config, blob: ExportBlob, work: Work, size: int,
             progress: bool) -> tuple[list[ClassInfo], list[Cell]]:
    """One item of work per class: its features task and its cells, each source's shards
    decoded once by tasks of their own; at most one class per task slot in flight."""
    import ray

    from pipeline.fanout import fan_out
    from pipeline.rayctx import init_ray

    init_ray(cfg.ray)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu, resources = task_resources(cfg.eval, gpus)
    log.info("evaluation tasks on %s (each asks Ray for %s)", "GPUs" if use_gpu else "CPUs", resources)
    kinds, methods = list(cfg.eval.kinds), list(cfg.eval.methods)
    decode = ray.remote(num_cpus=1)(decode_shard)
    features = ray.remote(num_returns=len(kinds) + 1, **resources)(features_task)
    cell = ray.remote(**resources)(cell_task)
    blob_ref, spec_ref = ray.put(blob), ray.put(cfg.eval)
    decoded: dict[str, list] = {}  # source -> refs of its decoded shards, submitted with its first class

    def submit(item: tuple[str, list[tuple[str, int]], ClassPlan]) -> list:
        source, shards_of, plan = item
        if source not in decoded:
            decoded[source] = [decode.remote(u, n, size) for u, n in shards_of]
        *kind_refs, info_ref = features.remote(use_gpu, blob_ref, plan, kinds, *decoded[source])
        return [info_ref] + [cell.remote(use_gpu, method, kind, spec_ref, kref, info_ref)
                             for kind, kref in zip(kinds, kind_refs) for method in methods]

    items = [(src.name, shards_of, plan) for src, shards_of, plans in work for plan in plans]
    slots = gpus if use_gpu else ray.cluster_resources().get("CPU", 1)
    done = fan_out(items, submit, limit=int(slots), desc="evaluate", unit="job",
                   weight=lambda _: len(kinds) * len(methods), progress=progress)
    return [d[0] for d in done], [c for d in done for c in d[1:]]


# ----------------------------------------------------------------------------- the model


@dataclass
class ModelRef:
    folder: str
    label: str  # how the result names the model
    name: str | None = None  # registered model name and version, when known
    version: str | None = None


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def resolve_model(cfg: Config, model: str | None, checkpoint: str | None) -> ModelRef:
    """The export folder to evaluate: a registry URI, an export folder, or the config's own run."""
    from pipeline.paths import export_dir

    if model and checkpoint:
        raise UserError("pass either a model URI or a checkpoint folder, not both")
    if model:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import load_registered, resolve_uri

        uri = resolve_uri(cfg.tracking.uri)
        folder = load_registered(model, tracking_uri=uri)
        m = _MODELS_URI.match(model)
        name = version = None
        if m:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            try:
                mv = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
                      else client.get_model_version(m["name"], m["version"]))
            except MlflowException as e:
                raise UserError(mask_secrets(f"model {model} not found in the registry at {uri}: {e.message}")) from None
            name, version = m["name"], str(mv.version)
        label = f"{model} (version {version})" if m and m["alias"] else model
        return ModelRef(folder, label, name, version)
    folder = checkpoint or export_dir(cfg)
    if not os.path.isfile(os.path.join(folder, "spec.json")):
        if checkpoint:
            raise UserError(f"--checkpoint {checkpoint!r} is not an exported projector folder (no spec.json there)")
        raise UserError(f"no exported model of run {cfg.name!r} at {folder}: run `adpretrain pretrain CONFIG` "
                        "first or pass --model models:/NAME@champion (or --checkpoint EXPORT_FOLDER)")
    name = version = None
    reg = os.path.join(folder, "registered.json")
    if os.path.isfile(reg):
        with open(reg) as f:
            r = json.load(f)
        name, version = r.get("name"), str(r.get("version"))
    return ModelRef(os.path.abspath(folder), os.path.abspath(folder), name, version)


def _check_selection_metric(spec: EvalSpec) -> tuple[str, str, str]:
    parts = spec.selection_metric.split("/")
    ok = (len(parts) == 3 and parts[0] in spec.methods and parts[1] in spec.kinds and parts[2] in METRICS)
    if not ok:
        raise UserError(
            f"eval.selection_metric {spec.selection_metric!r} must be METHOD/KIND/METRIC with METHOD in "
            f"eval.methods {list(spec.methods)}, KIND in eval.kinds {list(spec.kinds)} and METRIC one of "
            f"{', '.join(METRICS)}"
        )
    return parts[0], parts[1], parts[2]


def selection_value(rows: list[dict[str, Any]], metric: str) -> float | None:
    """Mean over the classes of the val sources of ``method/kind/metric`` (None if none has it)."""
    method, kind, name = metric.split("/")
    vals = [r[name] for r in rows if r["split"] == "val" and r["class"] != "mean"
            and r["method"] == method and r["kind"] == kind and r[name] is not None]
    return float(np.mean(vals)) if vals else None


# ----------------------------------------------------------------------------- the job


def _select_sources(cfg: Config, names: Sequence[str] | None) -> list[SourceSpec]:
    usable = [s for s in cfg.sources if s.split in ("eval", "val")]
    if names is None:
        chosen = usable
    else:
        by_name = {s.name: s for s in usable}
        bad = [n for n in names if n not in by_name]
        if bad:
            raise UserError(f"sources {bad} are not eval/val sources of the config; choose from {sorted(by_name)}")
        chosen = [by_name[n] for n in names]
    if not chosen:
        raise UserError("the config has no source with split: eval or split: val; add one to evaluate on")
    return chosen


def _rows(infos: list[ClassInfo], cells: list[Cell]) -> list[dict[str, Any]]:
    by_class = {(i.source, i.cls): i for i in infos}
    rows = []
    for c in cells:
        i = by_class[(c.source, c.cls)]
        rows.append({"split": c.role, "source": c.source, "class": c.cls, "method": c.method, "kind": c.kind,
                     **c.metrics, "n_fit": i.n_fit, "n_test": len(i.labels),
                     "n_test_abnormal": int(i.labels.sum())})
    return rows + mean_rows(rows)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _write_outputs(out_dir: str, rows: list[dict], infos: list[ClassInfo], cells: list[Cell], cfg: Config,
                   model: ModelRef, spec: dict, selection: dict | None) -> dict[str, str]:
    """Write the table, references and pictures into a fresh folder, then swap it in."""
    from pipeline.evaluate.pictures import map_grid, norm_histograms

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-", dir=parent)
    try:
        table = [r for r in rows if r["class"] != "mean"]
        means = [r for r in rows if r["class"] == "mean"]
        warn = ["", "**The backbone has random weights: these numbers do not reflect a pretrained backbone.**"] \
            if spec.get("random_weights") else []
        md = [f"# Evaluation of {model.label}", *warn, "",
              f"K-shot references: {cfg.eval.k_shot} (seed {cfg.eval.seed}); methods {list(cfg.eval.methods)}; "
              f"kinds {list(cfg.eval.kinds)}. {NA}: not available (no pixel masks).", "",
              "## Means over classes", "", markdown_table(means), "", "## Per class", "", markdown_table(table), ""]
        if selection is not None:
            md += ["## Model selection (val sources only)", "", "```", json.dumps(selection, indent=1), "```", ""]
        files = {"csv": "results.csv", "markdown": "results.md", "references": "references.json"}
        with open(os.path.join(tmp, files["csv"]), "w") as f:
            f.write(csv_text(rows))
        with open(os.path.join(tmp, files["markdown"]), "w") as f:
            f.write("\n".join(md))
        refs = {f"{i.source}/{i.cls}": i.refs for i in infos}
        with open(os.path.join(tmp, files["references"]), "w") as f:
            json.dump({"k_shot": cfg.eval.k_shot, "seed": cfg.eval.seed, "references": refs,
                       "test_images": {f"{i.source}/{i.cls}": i.test_keys for i in infos}}, f, indent=1)
        if selection is not None:
            files["selection"] = "selection.json"
            with open(os.path.join(tmp, files["selection"]), "w") as f:
                json.dump(selection, f, indent=1)
        shown = [k for k in ("raw", "pretrained") if k in cfg.eval.kinds] or list(cfg.eval.kinds)
        cell_at = {(c.source, c.cls, c.method, c.kind): c for c in cells}
        for i in infos:
            maps = {f"{m} {k}": cell_at[(i.source, i.cls, m, k)].picture_maps for m in cfg.eval.methods for k in shown}
            base = _safe(f"{i.source}__{i.cls}") + ".png"
            map_grid(os.path.join(tmp, "pictures", "maps", base), f"{i.source} / {i.cls}", i.picture_images,
                     i.picture_masks, maps)
            norm_histograms(os.path.join(tmp, "pictures", "norms", base),
                            f"{i.source} / {i.cls}: patch scores of test images", i.norms)
        files["pictures"] = "pictures"
        if os.path.exists(out_dir):
            old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {k: os.path.join(out_dir, v) for k, v in files.items()}


def _mlflow_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for r in rows:
        prefix = (f"mean/{r['source']}" if r["class"] == "mean" else f"{r['source']}/{r['class']}")
        for m in METRICS:
            if r[m] is not None:
                out[_metric_name(f"{prefix}/{r['method']}/{r['kind']}/{m}")] = r[m]
    return out


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)


def _parent_run(cfg: Config, spec: dict) -> str | None:
    """The pretraining run of the model, when it is in this tracking store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import resolve_uri

    run_id = (spec.get("provenance") or {}).get("run_id")
    if not run_id:
        return None
    uri = resolve_uri(cfg.tracking.uri)
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        log.warning("pretraining run %s of the model is not in %s: the evaluation run has no parent", run_id,
                    mask_secrets(uri))
        return None
    return run_id


def evaluate(cfg: Config, model: str | None = None, checkpoint: str | None = None,
             sources: Sequence[str] | None = None, register_decision: bool = True,
             parallel: bool = True, progress: bool = True) -> EvalResult:
    """Evaluate an exported projector on the eval and val sources (see the module docstring).

    ``model``: an MLflow model URI (models:/NAME@alias, models:/NAME/3); ``checkpoint``: an
    export folder; neither: the export of this config's pretraining run. ``sources``: names
    of eval/val sources to restrict to. ``register_decision``: move the champion/challenger
    alias of a registered version (computed on val sources only). ``parallel``: Ray tasks,
    else the same computation in-process.
    """
    from shards.manifest import check_shard_sizes
    from pipeline.export import read_spec
    from pipeline.paths import eval_dir
    from pipeline.tracking import ensure_store, select_champion
    from shards import storage
    from shards.manifest import read_manifest, shard_urls

    if not cfg.eval.methods or not cfg.eval.kinds:
        raise UserError(f"eval.methods {list(cfg.eval.methods)} and eval.kinds {list(cfg.eval.kinds)} must not be empty")
    if not (parallel and cluster_address(cfg.ray)):  # a cluster's GPUs are checked there (task_resources)
        devices.require_cuda(cfg.eval.device == "cuda", "eval.device")
    srcs = _select_sources(cfg, sources)
    has_val = any(s.split == "val" for s in srcs)
    if has_val:
        _check_selection_metric(cfg.eval)
    ref = resolve_model(cfg, model, checkpoint)
    decide = has_val and register_decision and ref.version is not None
    if decide and ref.name != cfg.tracking.model_name:
        raise UserError(f"the model is registered as {ref.name!r} but tracking.model_name is "
                        f"{cfg.tracking.model_name!r}; set tracking.model_name={ref.name}")
    if not has_val and register_decision and ref.version is not None:
        log.warning("no split: val source is evaluated: the champion alias is left as it is")
    spec = read_spec(ref.folder)
    if spec.get("random_weights"):
        log.warning("the model's backbone has RANDOM weights (the config said so): results do not reflect "
                    "a pretrained backbone")
    blob = ExportBlob.read(ref.folder)
    manifest = read_manifest(cfg.shards.url)
    counts = {storage.join(cfg.shards.url, e["path"]): e["count"] for e in manifest["shards"]}
    work = []
    for s in srcs:
        plans = _class_plans(cfg, s, manifest)
        urls = shard_urls(manifest, cfg.shards.url, source=s.name, split=s.split)
        if not urls or not plans:
            raise DataError(f"source {s.name!r} has no shards or no classes in {cfg.shards.url!r}; rebuild the shards")
        work.append((s, [(u, counts[u]) for u in urls], plans))
    check_shard_sizes(manifest, cfg.shards.url, [u for _, shards_of, _ in work for u, _ in shards_of])
    ensure_store(cfg.tracking)

    start = time.perf_counter()
    runner = _run_ray if parallel else _run_sequential
    infos, cells = runner(cfg, blob, work, int(spec["image_size"]), progress)
    log.info("evaluated %d classes x %d methods x %d kinds in %.1f s", len(infos), len(cfg.eval.methods),
             len(cfg.eval.kinds), time.perf_counter() - start)
    rows = _rows(infos, cells)

    selection = None
    if has_val:
        value = selection_value(rows, cfg.eval.selection_metric)
        if value is None or not math.isfinite(value):
            log.warning("model selection: %s is not available on the val sources; no decision",
                        cfg.eval.selection_metric)
        else:
            selection = {"metric": cfg.eval.selection_metric, "new_value": value, "champion_value": None,
                         "version": ref.version, "decision": None}
            if decide:
                selection.update(select_champion(cfg.tracking, ref.version, cfg.eval.selection_metric, value))

    out_dir = eval_dir(cfg)
    files = _write_outputs(out_dir, rows, infos, cells, cfg, ref, spec, selection)
    run_id, uri = _log_run(cfg, ref, spec, rows, selection, out_dir)
    return EvalResult(rows=rows, out_dir=out_dir, files=files, references={f"{i.source}/{i.cls}": i.refs for i in infos},
                      model=ref.label, selection=selection, run_id=run_id, tracking_uri=uri)


def _log_run(cfg: Config, ref: ModelRef, spec: dict, rows: list[dict], selection: dict | None,
             out_dir: str) -> tuple[str, str]:
    """The MLflow evaluation run: metrics per class and means, the decision, the output folder."""
    from pipeline.tracking import RunTracker

    tags = {"adpretrain.kind": "evaluation", "adpretrain.model": ref.label,
            "adpretrain.eval.k_shot": str(cfg.eval.k_shot)}
    if ref.version:
        tags["adpretrain.model.version"] = f"{ref.name}/{ref.version}"
    if spec.get("random_weights"):
        tags["warning"] = "RANDOM WEIGHTS: the backbone is not pretrained"
    if selection is not None:
        tags["adpretrain.selection"] = json.dumps(selection)
    run_name = f"{cfg.name}-eval" + (f"-v{ref.version}" if ref.version else "")
    metrics = _mlflow_metrics(rows)
    if selection is not None:
        metrics["selection/value"] = selection["new_value"]
        if selection.get("champion_value") is not None:
            metrics["selection/champion_value"] = selection["champion_value"]
    with RunTracker.start(cfg.tracking, cfg, run_name=run_name, tags=tags,
                          parent_run_id=_parent_run(cfg, spec)) as tracker:
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifacts(out_dir, "evaluation")
    return tracker.run_id, tracker.uri
