"""The run report: one self-contained folder (report.html + PNGs), also logged to MLflow.

It shows what a person checks after a run: the headline comparison (pretrained vs
residual vs raw features on the held-out classes), the loss curves, the anomaly maps and
the patch-score histograms, the val sources' diagnosis (nearest-neighbour distances and norms of
normal and abnormal patches), the model-selection decision, the data and the stage timings.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.config import Config  # noqa: E402

log = logging.getLogger(__name__)

HEADLINE = ("image_auroc", "pixel_auroc", "aupro")
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;
line-height:1.45;padding:0 1rem}h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2.2rem}.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.best{font-weight:700;background:#eaf6ea}.warn{background:#fff3cd;border:1px solid #e0c36a;
padding:.6rem 1rem;border-radius:4px}img{max-width:100%;border:1px solid #eee;margin:.4rem 0}
pre{background:#f7f7f7;padding:.7rem;overflow-x:auto;font-size:.85rem}.grid{display:grid;
grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:.8rem}figcaption{color:#555;font-size:.85rem}
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def headline_table(rows: list[dict], split: str = "eval") -> str:
    """Mean over classes per source: methods as rows, kinds as columns, per headline metric;
    the best kind of each method and metric is highlighted."""
    means = [r for r in rows if r["class"] == "mean" and r["split"] == split]
    if not means:
        return "<p>No evaluation results.</p>"
    kinds = list(dict.fromkeys(r["kind"] for r in means))
    out = []
    for source in dict.fromkeys(r["source"] for r in means):
        head = "".join(f"<th>{_esc(m)}<br>{_esc(k)}</th>" for m in HEADLINE for k in kinds)
        body = []
        for method in dict.fromkeys(r["method"] for r in means if r["source"] == source):
            cells = []
            for m in HEADLINE:
                vals = {r["kind"]: r[m] for r in means if r["source"] == source and r["method"] == method}
                best = max((v for v in vals.values() if v is not None), default=None)
                for k in kinds:
                    v = vals.get(k)
                    cls = ' class="best"' if v is not None and v == best else ""
                    cells.append(f"<td{cls}>{_fmt(v)}</td>")
            body.append(f'<tr><td class="l">{_esc(method)}</td>{"".join(cells)}</tr>')
        out.append(f"<h3>{_esc(source)}</h3><table><tr><th class=l>method</th>{head}</tr>{''.join(body)}</table>")
    return "\n".join(out)


def _loss_curves(cfg: Config, run_id: str, path: str) -> bool:
    from pipeline.tracking import metric_histories

    histories = metric_histories(cfg.tracking.uri, run_id,
                                 lambda k: k == "loss" or k.split("/")[0] in ("angle", "norm1", "norm2"))
    if not histories:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panel = {"loss": 0, "angle": 1, "norm1": 2, "norm2": 2}
    for k, hist in histories.items():
        axes[panel[k.split("/")[0]]].plot([step for step, _ in hist], [v for _, v in hist], label=k, lw=1.2)
    axes[0].set_title("total loss (sum over levels)")
    axes[1].set_title("angle loss per level")
    axes[2].set_title("norm loss per level and view")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[1:]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _figures(paths: list[str]) -> str:
    """The pictures at ``paths`` (relative to the report) with their names as captions."""
    return "".join(f'<figure><img src="{p}"><figcaption>{_esc(p)}</figcaption></figure>' for p in paths)


def _pictures(eval_dir: str, dest: str) -> dict[str, list[str]]:
    """Copy the evaluation's pictures into the report folder; returns relative paths by kind."""
    out: dict[str, list[str]] = {}
    for sub in ("maps", "norms", "diagnosis"):
        src = os.path.join(eval_dir, "pictures", sub)
        if not os.path.isdir(src):
            continue
        os.makedirs(os.path.join(dest, sub), exist_ok=True)
        for name in sorted(os.listdir(src)):
            shutil.copy2(os.path.join(src, name), os.path.join(dest, sub, name))
            out.setdefault(sub, []).append(f"{sub}/{name}")
    return out


DIAGNOSIS_COLUMNS = {"nn_auroc": "NN AUROC", "norm_auroc": "norm AUROC", "nn_median_normal": "NN median normal",
                     "nn_median_abnormal": "NN median abnormal", "nn_median_ratio": "NN median ratio",
                     "norm_median_normal": "norm median normal", "norm_median_abnormal": "norm median abnormal"}


def diagnosis_html(path: str, pictures: list[str]) -> str:
    """The diagnosis section: the means over the val classes from ``diagnosis.json`` at ``path``
    (pipeline/evaluate/diagnosis.py), and its picture(s) copied into the report."""
    with open(path) as f:
        doc = json.load(f)
    head = "".join(f"<th>{_esc(v)}</th>" for v in DIAGNOSIS_COLUMNS.values())
    body = "".join(f'<tr><td class="l">{_esc(r["level"])}</td><td class="l">{_esc(r["kind"])}</td>'
                   + "".join(f"<td>{_fmt(r[c])}</td>" for c in DIAGNOSIS_COLUMNS) + "</tr>" for r in doc["means"])
    return ("<h2>Diagnosis (validation source): nearest-neighbour distance and norm of test patches</h2>"
            "<p>Per level and feature kind, the mean over the val classes: the AUROC of each test patch's distance "
            "to its nearest normal fit patch (what PatchCore scores) and of its feature norm (what FeatureNorm "
            "scores), abnormal against normal patches, and the medians of both (ratio: abnormal / normal). "
            "Every class: "
            f"<code>{_esc(os.path.basename(path))}</code> in the evaluation folder.</p>"
            f'<table><tr><th class=l>level</th><th class=l>kind</th>{head}</tr>{body}</table>{_figures(pictures)}')


def selection_html(s: dict) -> str:
    """The model-selection section: the gate's outcome (every failed comparison), then the record."""
    failed = s["gate"]["failed"]
    gate = ('<p class="warn"><b>No-regression gate failed:</b> ' + "; ".join(map(_esc, failed)) + "</p>"
            if failed else "<p>No-regression gate passed.</p>")
    return f"<h2>Model selection (validation source)</h2>{gate}<pre>{_esc(json.dumps(s, indent=1))}</pre>"


def intervals_html(path: str) -> str:
    """How sure the differences of image AUROC are: pretrained features against the other kinds."""
    from pipeline.evaluate.intervals import markdown

    with open(path) as f:
        iv = json.load(f)
    return (f"<h2>How sure: pretrained against the other kinds</h2><p>Difference of the mean image AUROC and "
            f"its {iv['level']:.0%} interval (paired bootstrap over each class's test images, {iv['resamples']} "
            f"resamples).</p><pre>{_esc(markdown(iv['rows']))}</pre>")


def write_report(cfg: Config, chain) -> str:
    """Write ``{workdir}/{name}/report/report.html``; log the folder to the pretraining run."""
    from pipeline.export import read_spec
    from pipeline.paths import export_dir, report_dir
    from pipeline.tracking import RunTracker
    from shards.manifest import summary_table

    folder = report_dir(cfg)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    spec = read_spec(export_dir(cfg))
    run_id = spec["provenance"]["run_id"]
    ev = chain.evaluation
    parts = [f"<h1>adpretrain run <code>{_esc(cfg.name)}</code></h1>",
             f'<p class="sub">{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} · backbone {_esc(spec["backbone"]["name"])} '
             f'levels {_esc(spec["backbone"]["levels"])} · {_esc(spec["weights"])} · {cfg.train.num_workers} workers · '
             f'{cfg.train.steps} steps · MLflow run <code>{_esc(run_id)}</code></p>']
    if spec.get("random_weights"):
        parts.append('<p class="warn"><b>RANDOM WEIGHTS:</b> the backbone is not pretrained; these numbers say '
                     "nothing about a real backbone.</p>")
    parts.append("<h2>Held-out classes: pretrained vs residual vs raw features</h2>")
    parts.append("<p>Mean over the held-out evaluation classes (never seen in pretraining, never used for model "
                 "selection). Best feature kind per method and metric in bold.</p>")
    parts.append(headline_table(ev.rows, "eval") if ev else "<p>Evaluation did not run.</p>")
    if ev and "intervals" in ev.files:
        parts.append(intervals_html(ev.files["intervals"]))
    if ev and ev.selection:
        parts.append(selection_html(ev.selection))
    parts.append("<h2>Training</h2>")
    if _loss_curves(cfg, run_id, os.path.join(folder, "loss.png")):
        parts.append('<img src="loss.png" alt="loss curves">')
    pics = _pictures(ev.out_dir, folder) if ev else {}
    if pics.get("norms"):
        parts.append("<h2>Patch scores, normal vs abnormal patches</h2><div class=grid>")
        parts.append(_figures(pics["norms"]))
        parts.append("</div>")
    if ev and "diagnosis" in ev.files:
        parts.append(diagnosis_html(ev.files["diagnosis"], pics.get("diagnosis", [])))
    if pics.get("maps"):
        parts.append("<h2>Anomaly maps</h2>")
        parts.append(_figures(pics["maps"]))
    if ev:
        parts.append("<h2>All means</h2><pre>" + _esc(ev.table_markdown()) + "</pre>")
    if chain.manifest is not None:
        parts.append("<h2>Data</h2><pre>" + _esc(summary_table(chain.manifest)) + "</pre>")
    if chain.timings:
        rows = "".join(f'<tr><td class="l">{_esc(s)}</td><td>{t:.1f}</td><td class="l">{_esc(st)}</td></tr>'
                       for s, t, st in chain.timings)
        parts.append(f"<h2>Stages</h2><table><tr><th class=l>stage</th><th>seconds</th><th class=l>status</th></tr>{rows}</table>")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>adpretrain {_esc(cfg.name)}</title>" \
           f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    path = os.path.join(folder, "report.html")
    with open(path + ".tmp", "w") as f:
        f.write(page)
    os.replace(path + ".tmp", path)
    tracker = RunTracker.attach(cfg.tracking.model_copy(update={"system_metrics": False}), run_id)
    tracker.log_artifacts(folder, "report")
    tracker.close()
    log.info("report: %s", path)
    return path
