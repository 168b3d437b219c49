"""What an inspection writes and prints: results.csv, results.json and the summary table.

Both files hold one row per input, in input order, unreadable inputs included (status
``unreadable``, the reason in ``error``). Overlay paths are relative to the output folder and
nothing depends on the time, so the same inputs and state give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import os

from pipeline.inspect.state import InspectState

COLUMNS = ("index", "path", "status", "score", "decision", "overlay", "error")
RESULTS_CSV, RESULTS_JSON = "results.csv", "results.json"


def _cell(v) -> str:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_cell(r[c]) for c in COLUMNS])
    return buf.getvalue()


def counts(rows: list[dict]) -> dict:
    dec = [r["decision"] for r in rows]
    return {"inputs": len(rows), "scored": sum(r["status"] == "ok" for r in rows),
            "anomalous": dec.count("anomalous"), "normal": dec.count("normal"),
            "unreadable": sum(r["status"] == "unreadable" for r in rows)}


def results_json(rows: list[dict], state: InspectState, ignored: int) -> dict:
    return {"model": state.model, "method": state.method, "threshold": state.threshold, "fpr": state.fpr,
            "k_shot": state.k_shot, "seed": state.seed, "image_size": state.image_size,
            "backbone_bf16": state.bf16, "fitted": state.counts, "calibration": state.calibration,
            "state": "state", "counts": counts(rows), "ignored_non_image_files": ignored, "images": rows}


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(out_dir: str, rows: list[dict], state: InspectState, ignored: int = 0) -> tuple[str, str]:
    """Write results.csv and results.json into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    c, j = os.path.join(out_dir, RESULTS_CSV), os.path.join(out_dir, RESULTS_JSON)
    _write(c, csv_text(rows))
    _write(j, json.dumps(results_json(rows, state, ignored), indent=2) + "\n")
    return c, j


def _model_line(model: dict) -> str:
    named = model.get("version") and f"version {model['version']}" in model["label"]
    version = f" (registered {model['name']} version {model['version']})" if model.get("version") and not named else ""
    return f"{model['label']}{version}, export digest {model['digest'][:12]}"


def _top(rows: list[dict], n: int) -> list[str]:
    scored = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["score"])[:n]
    return [f"  {r['score']:>12.6g}  {r['decision']:<9}  {r['path']}" for r in scored]


def summary(rows: list[dict], state: InspectState, out_dir: str, reused: str | None, ignored: int,
            seconds: float, top: int = 10) -> str:
    """The table `adpretrain inspect` prints at the end."""
    k, c = counts(rows), state.counts
    fitted = (f"state reused from {reused} (no fitting)" if reused else
              f"{c['references']} references, {c['fit']} fit images, {c['calibration']} calibration images")
    rate = len(rows) / seconds if seconds > 0 else float("nan")
    lines = [
        "== inspect ==",
        f"  model        {_model_line(state.model)}",
        f"  method       {state.method}, K={state.k_shot}; {fitted}",
        f"  threshold    {state.threshold:.6g}: FPR <= {state.fpr} asked, {state.calibration['fpr_reached']:.4g} on "
        f"the {c['calibration']} calibration images",
        f"  inputs       {k['inputs']}: {k['scored']} scored ({k['anomalous']} anomalous, {k['normal']} normal), "
        f"{k['unreadable']} unreadable" + (f"; {ignored} non-image files in the folders ignored" if ignored else ""),
        f"  time         {seconds:.1f} s ({rate:.1f} images/s)",
    ]
    bad = [r for r in rows if r["status"] == "unreadable"]
    if bad:
        lines.append("== unreadable ==")
        lines += [f"  {r['path']}: {r['error']}" for r in bad]
    if k["scored"]:
        lines.append(f"== highest scores (of {k['scored']}) ==")
        lines.append(f"  {'score':>12}  {'decision':<9}  path")
        lines += _top(rows, top)
    lines += ["== outputs ==", f"  {os.path.join(out_dir, RESULTS_CSV)}", f"  {os.path.join(out_dir, RESULTS_JSON)}",
              f"  {os.path.join(out_dir, 'maps')}/ ({k['scored']} PNGs)", f"  {os.path.join(out_dir, 'state')}/"]
    return "\n".join(lines)
