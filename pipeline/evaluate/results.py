"""What an evaluation reports: the table, its files, and the MLflow evaluation run.

Rows (list of dicts): one per (dataset, class, method, kind), and the mean over classes per
dataset/method/kind. They are written as CSV and Markdown with the references and the
pictures (and the val sources' diagnosis, :mod:`pipeline.evaluate.diagnosis`) into
``{workdir}/{name}/{eval.out}/`` (a fresh folder swapped in whole), and logged
as an MLflow evaluation run: a child of the pretraining run when that run is in the store.
A metric not available (no pixel masks) is None, shown as ``n/a``, never 0.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.evalspec import METRICS
from pipeline.evaluate.cells import Cell
from pipeline.evaluate.diagnosis import write_diagnosis
from pipeline.evaluate.features import ClassInfo
from pipeline.evaluate.intervals import LEVEL, RESAMPLES
from pipeline.evaluate.intervals import markdown as intervals_markdown
from pipeline.evaluate.model import ModelRef
from shards.storage import mask_secrets

log = logging.getLogger(__name__)

NA = "n/a"


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
        if "diagnosis" in self.files:
            lines.append(f"  diagnosis (val)    {self.files['diagnosis']}")
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
            lines += [f"  gate failed        {line}" for line in s["gate"]["failed"]]
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


def table_rows(infos: list[ClassInfo], cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per cell, then the means."""
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


def write_outputs(out_dir: str, rows: list[dict], infos: list[ClassInfo], cells: list[Cell], cfg: Config,
                  model: ModelRef, spec: dict, selection: dict | None, intervals: list[dict]) -> dict[str, str]:
    """Write the table, the intervals (``intervals.interval_rows``), references, pictures and
    diagnosis into a fresh folder, then swap it in."""
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-", dir=parent)
    try:
        files = _write_tables(tmp, rows, infos, cfg, model, spec, selection, intervals)
        _write_pictures(tmp, infos, cells, cfg)
        files["pictures"] = "pictures"
        files.update(write_diagnosis(tmp, infos, model, spec["backbone"]["levels"]))
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


def _markdown(rows: list[dict], cfg: Config, model: ModelRef, spec: dict, selection: dict | None,
              intervals: list[dict]) -> str:
    table = [r for r in rows if r["class"] != "mean"]
    means = [r for r in rows if r["class"] == "mean"]
    warn = ["", "**The backbone has random weights: these numbers do not reflect a pretrained backbone.**"] \
        if spec.get("random_weights") else []
    md = [f"# Evaluation of {model.label}", *warn, "",
          f"K-shot references: {cfg.eval.k_shot} (seed {cfg.eval.seed}); methods {list(cfg.eval.methods)}; "
          f"kinds {list(cfg.eval.kinds)}. {NA}: not available (no pixel masks).", "",
          "## Means over classes", "", markdown_table(means), ""]
    if any(r["kind"] == "pretrained" for r in intervals):
        md += ["## Pretrained features against the other kinds: image AUROC", "",
               f"Mean over the classes of the difference, and its {LEVEL:.0%} interval (paired bootstrap over the "
               f"test images of each class, {RESAMPLES} resamples; every kind against every other: intervals.json). "
               "`better` or `worse` when the interval excludes 0.", "", intervals_markdown(intervals), ""]
    md += ["## Per class", "", markdown_table(table), ""]
    if selection is not None:
        md += ["## Model selection (val sources only)", "", "```", json.dumps(selection, indent=1), "```", ""]
    return "\n".join(md)


def _write_tables(tmp: str, rows: list[dict], infos: list[ClassInfo], cfg: Config, model: ModelRef,
                  spec: dict, selection: dict | None, intervals: list[dict]) -> dict[str, str]:
    """The CSV, the Markdown, the intervals, the references (and the selection) in ``tmp``: name -> file name."""
    files = {"csv": "results.csv", "markdown": "results.md", "references": "references.json",
             "intervals": "intervals.json"}
    with open(os.path.join(tmp, files["csv"]), "w") as f:
        f.write(csv_text(rows))
    with open(os.path.join(tmp, files["markdown"]), "w") as f:
        f.write(_markdown(rows, cfg, model, spec, selection, intervals))
    with open(os.path.join(tmp, files["intervals"]), "w") as f:
        json.dump({"level": LEVEL, "resamples": RESAMPLES, "metric": "image_auroc", "rows": intervals}, f, indent=1)
    refs = {f"{i.source}/{i.cls}": i.refs for i in infos}
    with open(os.path.join(tmp, files["references"]), "w") as f:
        json.dump({"k_shot": cfg.eval.k_shot, "seed": cfg.eval.seed, "references": refs,
                   "test_images": {f"{i.source}/{i.cls}": i.test_keys for i in infos}}, f, indent=1)
    if selection is not None:
        files["selection"] = "selection.json"
        with open(os.path.join(tmp, files["selection"]), "w") as f:
            json.dump(selection, f, indent=1)
    return files


def _write_pictures(tmp: str, infos: list[ClassInfo], cells: list[Cell], cfg: Config) -> None:
    """Per class: maps of the picture images, and histograms of the patch scores."""
    from pipeline.evaluate.pictures import map_grid, norm_histograms

    shown = [k for k in ("raw", "pretrained") if k in cfg.eval.kinds] or list(cfg.eval.kinds)
    cell_at = {(c.source, c.cls, c.method, c.kind): c for c in cells}
    for i in infos:
        maps = {f"{m} {k}": cell_at[(i.source, i.cls, m, k)].picture_maps for m in cfg.eval.methods for k in shown}
        base = _safe(f"{i.source}__{i.cls}") + ".png"
        map_grid(os.path.join(tmp, "pictures", "maps", base), f"{i.source} / {i.cls}", i.picture_images,
                 i.picture_masks, maps)
        norm_histograms(os.path.join(tmp, "pictures", "norms", base),
                        f"{i.source} / {i.cls}: patch scores of test images", i.norms)


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
    from pipeline.tracking import resolve_uri, run_exists

    run_id = (spec.get("provenance") or {}).get("run_id")
    if not run_id:
        return None
    uri = resolve_uri(cfg.tracking.uri)
    if not run_exists(uri, run_id):
        log.warning("pretraining run %s of the model is not in %s: the evaluation run has no parent", run_id,
                    mask_secrets(uri))
        return None
    return run_id


def log_run(cfg: Config, ref: ModelRef, spec: dict, rows: list[dict], selection: dict | None,
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
