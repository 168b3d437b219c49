"""Downstream evaluation jobs: raw vs residual vs pretrained features, per dataset and class.

For every ``split: eval`` and ``split: val`` source and each of its classes:

1. its shards are checked against the manifest and decoded once, whole; a fixed, seeded
   K-shot reference set, a fit set and a test set are drawn from its images
   (:mod:`pipeline.evaluate.plan`);
2. features of every kind come from one code path: the backbone runs once, ``raw`` is its
   output, ``residual`` matches it against the bank of the K references, ``pretrained``
   runs the projector on the residual (one task per class, :mod:`pipeline.evaluate.features`);
3. one task per (dataset, class, method, kind) fits the method on the fit set and scores
   the test images; image metrics always, pixel metrics only when every abnormal test
   image has a mask (otherwise None, reported as n/a, never 0; :mod:`pipeline.evaluate.cells`).

With ``parallel=True`` these are Ray tasks (features shared through the object store);
``parallel=False`` runs the same functions in-process (:mod:`pipeline.evaluate.schedule`).
Every task on the CPU computes with one thread, so both give identical numbers.

Devices (``eval.device``): on CUDA the feature tasks (backbone, residual matching,
projector) and the method tasks (FeatureNorm, PaDiM, PatchCore's aggregation and coreset
selection) run on a GPU, each Ray task asking for ``eval.gpus_per_task`` of one and taking
the device Ray gave it (pipeline.devices.task_device); PatchCore's nearest-neighbour search
(faiss), the shard decoding and the metrics stay on the CPU. Features travel between tasks
as CPU tensors.

Results (:mod:`pipeline.evaluate.results`): a table (list of dict rows: per class, and the
mean over classes per dataset/method/kind) written as CSV and Markdown with the pictures
under ``{workdir}/{name}/{eval.out}/``, an MLflow evaluation run (a child of the pretraining
run when that run is in the store), and, for a registered model version, the champion
decision computed on the ``split: val`` sources only (:mod:`pipeline.evaluate.selection`).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from pipeline import devices
from pipeline.config import Config
from pipeline.evaluate.features import ExportBlob
from pipeline.evaluate.intervals import class_scores, interval_rows
from pipeline.evaluate.model import ModelRef, resolve_model
from pipeline.evaluate.plan import plan_work, select_sources
from pipeline.evaluate.results import EvalResult, log_run, table_rows, write_outputs
from pipeline.evaluate.schedule import run_ray, run_sequential
from pipeline.evaluate.selection import select_model
from pipeline.paths import eval_dir
from pipeline.rayctx import cluster_address
from shards.errors import UserError

log = logging.getLogger(__name__)


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
    from pipeline.export import read_spec
    from pipeline.tracking import ensure_store

    _check_request(cfg, parallel)
    srcs = select_sources(cfg, sources)
    has_val = any(s.split == "val" for s in srcs)
    ref = resolve_model(cfg, model, checkpoint)
    decide = _decides(cfg, ref, has_val, register_decision)
    spec = read_spec(ref.folder)
    if spec.get("random_weights"):
        log.warning("the model's backbone has RANDOM weights (the config said so): results do not reflect "
                    "a pretrained backbone")
    blob = ExportBlob.read(ref.folder)
    work = plan_work(cfg, srcs)
    ensure_store(cfg.tracking)

    start = time.perf_counter()
    runner = run_ray if parallel else run_sequential
    infos, cells = runner(cfg, blob, work, int(spec["image_size"]), progress)
    log.info("evaluated %d classes x %d methods x %d kinds in %.1f s", len(infos), len(cfg.eval.methods),
             len(cfg.eval.kinds), time.perf_counter() - start)
    rows, scores = table_rows(infos, cells), class_scores(infos, cells)
    selection = select_model(cfg, ref, rows, decide, scores) if has_val else None

    out_dir = eval_dir(cfg)
    files = write_outputs(out_dir, rows, infos, cells, cfg, ref, spec, selection, interval_rows(scores))
    run_id, uri = log_run(cfg, ref, spec, rows, selection, out_dir)
    if selection is not None and "decision_error" in selection:
        raise UserError(f"{selection['decision_error']}; the evaluation itself is written to {out_dir} and "
                        f"to MLflow run {run_id}")
    return EvalResult(rows=rows, out_dir=out_dir, files=files, references={f"{i.source}/{i.cls}": i.refs for i in infos},
                      model=ref.label, selection=selection, run_id=run_id, tracking_uri=uri)


def _check_request(cfg: Config, parallel: bool) -> None:
    """Methods and kinds to evaluate, and a GPU here when eval.device asks for one."""
    if not cfg.eval.methods or not cfg.eval.kinds:
        raise UserError(f"eval.methods {list(cfg.eval.methods)} and eval.kinds {list(cfg.eval.kinds)} must not be empty")
    if not (parallel and cluster_address(cfg.ray)):  # a cluster's GPUs are checked there (task_resources)
        devices.require_cuda(cfg.eval.device == "cuda", "eval.device")


def _decides(cfg: Config, ref: ModelRef, has_val: bool, register_decision: bool) -> bool:
    """Whether this evaluation decides on the champion alias: a registered version scored on val sources."""
    decide = has_val and register_decision and ref.version is not None
    if decide and ref.name != cfg.tracking.model_name:
        raise UserError(f"the model is registered as {ref.name!r} but tracking.model_name is "
                        f"{cfg.tracking.model_name!r}; set tracking.model_name={ref.name}")
    if not has_val and register_decision and ref.version is not None:
        log.warning("no split: val source is evaluated: the champion alias is left as it is")
    return decide
