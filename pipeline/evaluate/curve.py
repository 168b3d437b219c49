"""The validation curve: every training checkpoint of the config's pretraining run evaluated on
the ``split: val`` sources, so that a projector that fits what is specific to the renderer
shows as a value that rises, then falls, with the steps.

The export of the config's last pretraining (:func:`pipeline.paths.export_dir`) names its
MLflow training run in ``spec.json`` (``provenance.run_id``). Each checkpoint that run
recorded (``checkpoints/step-N`` artifacts, :meth:`pipeline.tracking.RunTracker.log_checkpoint`)
becomes an export of its own with the centers and spec of the final one
(:func:`pipeline.export.derive_export`; never registered), in
:func:`pipeline.paths.checkpoint_dir`. Each is evaluated by :func:`pipeline.evaluate.jobs.evaluate`
on the val sources with the selection's methods, on pretrained features; raw and residual
features do not depend on the step and are evaluated once, with the first checkpoint.

An evaluation is kept under the run id and the step, in a folder keyed by what it is computed
from (the weights' sha256, the eval settings, the val sources, the shard manifest;
:func:`pipeline.paths.checkpoint_eval_dir`), with its values in ``values.json``, written last:
a rerun evaluates only what is missing, and never reuses a result of other weights or settings.

Output, in :func:`pipeline.paths.curve_dir`: ``curve.json`` (per step, each method's mean over
the val classes of the selection's metric, and the selection value; the same for raw and
residual features) and ``curve.png``, both logged to an MLflow curve run, a child of the
training run, with the metrics ``val_curve/<method>`` and ``val_curve/selection`` at each step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field

from pipeline.config import Config, EvalSpec
from pipeline.evalspec import Selection
from pipeline.paths import checkpoint_dir, checkpoint_eval_dir, curve_dir, export_dir, run_dir
from shards import storage
from shards.errors import UserError

log = logging.getLogger(__name__)

BASELINES = ("raw", "residual")  # the kinds that do not depend on the projector
VALUES_FILE = "values.json"


@dataclass(frozen=True)
class _Run:
    """The config's export, its spec, and the MLflow run that trained it."""

    export: str
    spec: dict
    run_id: str


@dataclass
class CurveResult:
    """The curve of one training run: per checkpoint, each method's value and the selection value."""

    run_id: str
    selection: Selection
    sources: list[str]
    points: list[dict]  # {"step", "pretrained": {method: value}, "selection": value}, by step
    baselines: dict[str, dict[str, float | None]]  # raw / residual -> {method: value}
    evaluated: list[int] = field(default_factory=list)  # steps evaluated by this call
    reused: list[int] = field(default_factory=list)  # steps whose evaluation was found
    files: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    tracking_uri: str = ""

    def to_json(self) -> dict:
        s = self.selection
        return {"run_id": self.run_id, "selection_metric": "+".join(s.methods) + f"/{s.kind}/{s.metric}",
                "metric": s.metric, "methods": list(s.methods), "sources": self.sources,
                "steps": self.points, **self.baselines}

    def table_markdown(self) -> str:
        methods = self.selection.methods
        lines = ["| step | " + " | ".join(methods) + " | selection |", "| ---: |" + " ---: |" * (len(methods) + 1)]
        for kind, values in self.baselines.items():
            lines.append(f"| {kind} | " + " | ".join(_fmt(values[m]) for m in methods) + " | |")
        for p in self.points:
            lines.append(f"| {p['step']} | " + " | ".join(_fmt(p["pretrained"][m]) for m in methods)
                         + f" | {_fmt(p['selection'])} |")
        return "\n".join(lines)

    def describe(self) -> str:
        lines = [f"validation curve of training run {self.run_id}: {self.selection.metric}, mean over the classes of "
                 f"{', '.join(self.sources)}", "", self.table_markdown(), "",
                 f"  checkpoints  {len(self.evaluated)} evaluated, {len(self.reused)} reused",
                 f"  curve.json   {self.files['json']}", f"  curve.png    {self.files['png']}"]
        if self.mlflow_run_id:
            lines.append(f"  MLflow run   {self.mlflow_run_id} ({storage.mask_secrets(self.tracking_uri)})")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def build_curve(cfg: Config, progress: bool = True) -> CurveResult:
    """Evaluate every checkpoint of the config's training run on the val sources (see the module
    docstring); write ``curve.json`` and ``curve.png`` and log them with the metrics to MLflow."""
    from pipeline.tracking import checkpoint_steps

    selection = _selection(cfg)
    sources = _val_sources(cfg)
    run = _training_run(cfg)
    steps = checkpoint_steps(cfg.tracking.uri, run.run_id)
    if not steps:
        raise UserError(f"MLflow training run {run.run_id} (of the export {run.export}) recorded no checkpoints: "
                        "pretrain again with train.checkpoint_every below train.steps")
    baselines = [k for k in BASELINES if k in cfg.eval.kinds]
    result = CurveResult(run.run_id, selection, sources, [], {}, tracking_uri=cfg.tracking.uri)
    for i, step in enumerate(steps):
        kinds = [*baselines, "pretrained"] if i == 0 else ["pretrained"]
        values, fresh = _step_values(cfg, run, step, kinds, sources, progress)
        (result.evaluated if fresh else result.reused).append(step)
        result.points.append({"step": step, "pretrained": values["pretrained"], "selection": values["selection"]})
        result.baselines.update({k: values[k] for k in baselines if k in values})
    result.files = _write_files(cfg, result)
    result.mlflow_run_id = _log_run(cfg, result)
    return result


def _selection(cfg: Config) -> Selection:
    s = cfg.eval.selection
    if s is None or s.kind != "pretrained":
        raise UserError(f"eval.selection_metric {cfg.eval.selection_metric!r} is not on pretrained features (or "
                        f"eval.kinds {list(cfg.eval.kinds)} has none): the validation curve follows the pretrained "
                        "features over the training steps; set eval.selection_metric to METHODS/pretrained/METRIC")
    return s


def _val_sources(cfg: Config) -> list[str]:
    names = [s.name for s in cfg.sources_with("val")]
    if not names:
        raise UserError("the config has no source with split: val: the validation curve is drawn on the val "
                        "sources; add one (see configs/local.yaml)")
    return names


def _training_run(cfg: Config) -> _Run:
    """The config's export, its spec and the MLflow run that trained it."""
    from pipeline.export import SPEC_FILE, read_spec
    from pipeline.tracking import resolve_uri, run_exists

    folder = export_dir(cfg)
    if not os.path.isfile(os.path.join(folder, SPEC_FILE)):
        raise UserError(f"no exported model of run {cfg.name!r} at {folder}: the validation curve follows the "
                        "checkpoints of the config's own pretraining; run `adpretrain pretrain CONFIG` first")
    spec = read_spec(folder)
    run_id = (spec.get("provenance") or {}).get("run_id")
    uri = resolve_uri(cfg.tracking.uri)
    if not run_id or not run_exists(uri, run_id):
        raise UserError(storage.mask_secrets(
            f"{os.path.join(folder, SPEC_FILE)} names the MLflow training run {run_id!r}, which is not in the "
            f"store at {uri}: set tracking.uri to the store the model was trained with, or pretrain again", uri))
    return _Run(folder, spec, run_id)


def _step_values(cfg: Config, run: _Run, step: int, kinds: list[str], sources: list[str],
                 progress: bool) -> tuple[dict, bool]:
    """The values of the checkpoint at ``step`` on ``kinds``, and whether they were evaluated now
    (False: found, computed from the same inputs)."""
    from pipeline.evaluate.jobs import evaluate
    from pipeline.evaluate.selection import method_value, selection_value
    from shards.manifest import manifest_sha256

    folder, sha = _step_export(cfg, run, step)
    step_cfg = _step_config(cfg, kinds, cfg.eval.out)
    inputs = {"projector_sha256": sha, "sources": [s.model_dump(mode="json") for s in cfg.sources_with("val")],
              "eval": {k: v for k, v in step_cfg.eval.model_dump(mode="json").items() if k not in ("out", "curve")},
              "manifest_sha256": manifest_sha256(cfg.shards.url)}
    out = checkpoint_eval_dir(cfg, run.run_id, step, inputs)
    if os.path.isfile(os.path.join(out, VALUES_FILE)):
        log.info("validation curve: step %d of run %s already evaluated (%s)", step, run.run_id, out)
        return json.loads(storage.read_text(os.path.join(out, VALUES_FILE))), False
    step_cfg = _step_config(cfg, kinds, os.path.relpath(out, run_dir(cfg)))
    found = evaluate(step_cfg, checkpoint=folder, sources=sources, register_decision=False, progress=progress)
    s = cfg.eval.selection
    values = {k: {m: method_value(found.rows, m, k, s.metric) for m in s.methods} for k in kinds}
    values["selection"] = selection_value(found.rows, cfg.eval)
    storage.write_text(os.path.join(out, VALUES_FILE), json.dumps(values, indent=1))
    return values, True


def _step_export(cfg: Config, run: _Run, step: int) -> tuple[str, str]:
    """The export of the checkpoint at ``step`` (made when missing or of other weights) and the
    sha256 of its projector weights."""
    from safetensors.torch import load_file

    from pipeline.export import derive_export, read_spec
    from pipeline.tracking import checkpoint_artifact, download_checkpoint

    folder = os.path.join(checkpoint_dir(cfg, run.run_id, step), "export")
    with tempfile.TemporaryDirectory(prefix="adpretrain-checkpoint-") as tmp:
        weights = download_checkpoint(cfg.tracking.uri, run.run_id, step, tmp)
        with open(weights, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        try:
            if read_spec(folder)["provenance"].get("projector_sha256") == sha:
                return folder, sha
        except UserError:  # not made yet
            pass
        provenance = {**run.spec["provenance"], "checkpoint": f"runs:/{run.run_id}/{checkpoint_artifact(step)}",
                      "step": step, "projector_sha256": sha}
        derive_export(run.export, folder, load_file(weights), provenance)
    return folder, sha


def _step_config(cfg: Config, kinds: list[str], out: str) -> Config:
    """``cfg`` evaluating the selection's methods on ``kinds`` into ``out`` (under the run folder),
    the gate off (the curve decides nothing)."""
    s = cfg.eval.selection
    ev = EvalSpec.model_validate({**cfg.eval.model_dump(), "methods": list(s.methods), "kinds": kinds, "gate": {},
                                  "selection_metric": "+".join(s.methods) + f"/{s.kind}/{s.metric}", "out": out})
    return cfg.model_copy(update={"eval": ev})


def _write_files(cfg: Config, result: CurveResult) -> dict[str, str]:
    folder = curve_dir(cfg)
    files = {"json": os.path.join(folder, "curve.json"), "png": os.path.join(folder, "curve.png")}
    storage.write_text(files["json"], json.dumps(result.to_json(), indent=1))
    _plot(files["png"], result)
    return files


def _plot(path: str, result: CurveResult) -> None:
    """The selection value and each method against the steps; raw and residual as horizontal lines."""
    from pipeline.evaluate.pictures import _save  # first: it sets matplotlib's Agg backend

    import matplotlib.pyplot as plt

    def num(v: float | None) -> float:
        return math.nan if v is None else v

    steps = [p["step"] for p in result.points]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(steps, [num(p["selection"]) for p in result.points], "k-o", lw=2.5, zorder=5, label="selection (mean)")
    for i, m in enumerate(result.selection.methods):
        colour = f"C{i}"
        ax.plot(steps, [num(p["pretrained"][m]) for p in result.points], "-o", color=colour, label=f"{m} pretrained")
        for kind, style in zip(BASELINES, (":", "--")):
            if kind in result.baselines:
                ax.axhline(num(result.baselines[kind][m]), color=colour, ls=style, lw=1, label=f"{m} {kind}")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{result.selection.metric} (mean over val classes)")
    ax.set_title(f"validation curve of run {result.run_id[:12]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def _log_run(cfg: Config, result: CurveResult) -> str:
    """The MLflow curve run, a child of the training run: the metrics at each step, the two files."""
    from pipeline.tracking import RunTracker

    tags = {"adpretrain.kind": "curve", "adpretrain.curve.training_run": result.run_id}
    with RunTracker.start(cfg.tracking, cfg, run_name=f"{cfg.name}-curve", tags=tags,
                          parent_run_id=result.run_id) as tracker:
        for p in result.points:
            metrics = {f"val_curve/{m}": v for m, v in p["pretrained"].items() if v is not None}
            if p["selection"] is not None:
                metrics["val_curve/selection"] = p["selection"]
            tracker.log_metrics(metrics, step=p["step"])
        tracker.log_artifacts(curve_dir(cfg), "curve")
    return tracker.run_id
