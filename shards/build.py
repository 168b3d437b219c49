"""The dataset-building stage: scan every source, plan the shards, write them over Ray, and
write the manifest last.

Order of work, so that a bad config, an unknown layout or an unreachable store fails before
anything is written: config (validated by the caller) -> the output store is reachable ->
every source is scanned (layout, classes, scan-time quarantine within its budget) -> plan
-> shards already committed from the same plan are kept -> the rest run as Ray tasks, one
per shard -> the invariant inputs = written + quarantined + ignored (every file under a
source root, see docs/layouts.md) and the quarantine budget are checked ->
``build-info.json`` (timings, not deterministic) -> ``manifest.json`` (deterministic, byte
for byte the same for the same inputs and settings, however often the build was interrupted).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from typing import Any

from pipeline.config import Config
from shards.spec import ShardsSpec, SourceSpec
from shards.errors import DataError
from shards import storage
from shards.manifest import BUILD_INFO, MANIFEST, MANIFEST_FORMAT
from shards.sources import SourceScan, scan_source
from shards.writer import ShardPlan, committed, is_temporary, plan_stream, write_shard

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"shard-\d{6}\.tar(\.json)?$")


# ----------------------------------------------------------------------------- planning


def plan_build(scans: list[SourceScan], spec: ShardsSpec) -> list[ShardPlan]:
    """Every shard of the build, in a fixed order (source, stream, index)."""
    plans: list[ShardPlan] = []
    for scan in scans:
        for stream in ("normal", "abnormal"):
            recs = [r for r in scan.records if r.stream == stream]
            masks = None if stream == "normal" else scan.spec.masks != "none"
            plans += plan_stream(recs, spec.max_samples_per_shard, spec.max_bytes_per_shard, masks)
    return plans


def _folders(scans: list[SourceScan]) -> list[str]:
    return [f"{s.spec.name}/{s.spec.split}/{stream}" for s in scans for stream in ("normal", "abnormal")]


# ----------------------------------------------------------------------------- running


def _run_on_ray(todo: list[ShardPlan], url: str, cfg: Config, progress: bool) -> dict[str, dict]:
    """Write the shards as Ray tasks, at most ``shards.tasks`` at once; sidecars by shard path."""
    import ray

    from pipeline.fanout import fan_out

    task = ray.remote(num_cpus=1)(write_shard)
    limit = cfg.shards.tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    sidecars = fan_out(todo, lambda plan: task.remote(plan, url), limit=limit, desc="build-shards", unit="img",
                       weight=lambda plan: len(plan.records), progress=progress)
    return {plan.path: sidecar for plan, sidecar in zip(todo, sidecars)}


def _clean(url: str, scans: list[SourceScan], plans: list[ShardPlan]) -> None:
    """Remove temporary files of interrupted writes and shards that are no longer planned."""
    planned = {p.path for p in plans} | {p.path + ".json" for p in plans}
    for folder in _folders(scans):
        for name in storage.listdir(storage.join(url, folder)):
            rel = f"{folder}/{name}"
            if is_temporary(name) or (_SHARD_NAME.match(name) and rel not in planned):
                log.info("removing %s (left by an earlier build)", rel)
                storage.remove(storage.join(url, rel))


# ----------------------------------------------------------------------------- manifest


def _quarantine_report(source: str, entries: list[dict], inputs: int, limit: float) -> str:
    reasons = Counter(re.sub(r"\(.*", "", e["reason"]).strip() for e in entries)
    lines = [
        f"source {source!r}: {len(entries)} of {inputs} inputs quarantined "
        f"({len(entries) / max(inputs, 1):.1%} > shards.max_quarantine_fraction {limit:.1%}):"
    ]
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common(8)]
    lines += [f"  e.g. {e['path']}: {e['reason']}" for e in entries[:5]]
    return "\n".join(lines)


def _check_budget(cfg: Config, inputs: dict[str, int], quarantined: list[dict]) -> list[str]:
    by_source: dict[str, list[dict]] = defaultdict(list)
    for q in quarantined:
        by_source[q["source"]].append(q)
    limit = cfg.shards.max_quarantine_fraction
    return [
        _quarantine_report(name, by_source[name], n, limit)
        for name, n in inputs.items()
        if len(by_source[name]) > limit * n
    ]


NO_CLASS = "(no class)"
"""The class row of quarantined entries that lie outside every class folder."""


def make_manifest(
    cfg: Config, scans: list[SourceScan], plans: list[ShardPlan], sides: dict[str, dict]
) -> dict[str, Any]:
    """The manifest from the plan and the shards' sidecars; checks inputs = written + quarantined + ignored.

    The counts are in files: ``written`` is the images and masks in the shards, a mask of an
    image quarantined while writing is quarantined too (unless another written image uses it).
    """
    shards, quarantined, rows = [], [], Counter()
    per_class: dict[tuple[str, str], Counter] = defaultdict(Counter)
    written_masks: dict[str, set[str]] = defaultdict(set)
    unwritten: list = []
    for scan in scans:
        for q in scan.quarantined:
            quarantined.append(q.to_dict())
    for plan in plans:
        side = sides[plan.path]
        bad = {q["path"] for q in side["quarantined"]}
        written = [r for r in plan.records if r.path not in bad]
        if len(written) != side["count"] or len(bad) + len(written) != len(plan.records):
            raise DataError(
                f"shard {plan.path}: {side['count']} samples written and {len(bad)} quarantined do not add up to "
                f"its {len(plan.records)} inputs; delete the shard and its sidecar and rebuild"
            )
        shards.append(
            {
                "path": plan.path,
                "source": plan.source,
                "split": plan.role,
                "stream": plan.stream,
                "masks": plan.masks,
                "count": side["count"],
                "bytes": side["bytes"],
                "sha256": side["sha256"],
            }
        )
        quarantined += [{"source": plan.source, **q} for q in side["quarantined"]]
        unwritten += [r for r in plan.records if r.path in bad and r.mask_path]
        for r in written:
            rows[(r.source, r.cls, r.view, r.label, r.defect)] += 1
            c = per_class[(r.source, r.cls)]
            c["abnormal" if r.label else "normal"] += 1
            if r.mask_path:
                written_masks[r.source].add(r.mask_path)
            if r.label and plan.masks is False and plan.role == "pretrain":
                c["excluded_from_training"] += 1
        for cls, n in side["class_bytes"].items():
            per_class[(plan.source, cls)]["bytes"] += n
    accounted = {(r.source, r.mask_path) for r in unwritten if r.mask_path in written_masks[r.source]}
    for r in unwritten:
        if (r.source, r.mask_path) not in accounted:
            accounted.add((r.source, r.mask_path))  # one entry per file
            quarantined.append({"source": r.source, "path": r.mask_path, "class": r.cls,
                                "reason": f"mask of a quarantined image ({r.path})"})
    for q in quarantined:
        per_class[(q["source"], q["class"] or NO_CLASS)]["quarantined"] += 1
    quarantined.sort(key=lambda q: (q["source"], q["path"], q["reason"]))

    sources: dict[str, Any] = {}
    totals = Counter()
    for scan in scans:
        s = scan.spec
        mine = {k[1]: v for k, v in per_class.items() if k[0] == s.name}
        normal = sum(v["normal"] for v in mine.values())
        abnormal = sum(v["abnormal"] for v in mine.values())
        masks = len(written_masks[s.name])
        summary = {
            "inputs": scan.inputs,
            "written": normal + abnormal + masks,
            "quarantined": sum(v["quarantined"] for v in mine.values()),
            "ignored": sum(scan.ignored.values()),
            "normal": normal,
            "abnormal": abnormal,
            "masks": masks,
            "excluded_from_training": sum(v["excluded_from_training"] for v in mine.values()),
            "bytes": sum(p["bytes"] for p in shards if p["source"] == s.name),
            "shards": sum(1 for p in shards if p["source"] == s.name),
        }
        if summary["inputs"] != summary["written"] + summary["quarantined"] + summary["ignored"]:
            raise DataError(
                f"source {s.name!r}: {summary['inputs']} inputs but {summary['written']} written + "
                f"{summary['quarantined']} quarantined + {summary['ignored']} ignored; this is a bug in the "
                "build, please report it"
            )
        totals.update(summary)
        sources[s.name] = {
            "layout": s.layout,
            "root": s.root,
            "split": s.split,
            "masks": s.masks,
            "classes": {
                cls: {k: mine.get(cls, Counter())[k] for k in
                      ("normal", "abnormal", "quarantined", "excluded_from_training", "bytes")}
                for cls in sorted(set(scan.classes) | set(mine))
            },
            "ignored_by_rule": dict(sorted(scan.ignored.items())),
            **summary,
        }
    return {
        "format": MANIFEST_FORMAT,
        "settings": {
            "max_samples_per_shard": cfg.shards.max_samples_per_shard,
            "max_bytes_per_shard": cfg.shards.max_bytes_per_shard,
        },
        "totals": {k: totals[k] for k in ("inputs", "written", "quarantined", "ignored", "normal", "abnormal",
                                          "masks", "excluded_from_training", "shards", "bytes")},
        "sources": sources,
        "shards": shards,
        "counts": [
            {"source": s, "class": c, "view": v, "label": lab, "defect": d, "count": n}
            for (s, c, v, lab, d), n in sorted(rows.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
        ],
        "quarantined": quarantined,
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------- the stage


def _synthesize(spec: SourceSpec) -> None:
    """Generate the source's synthetic data when its root does not exist and the config asks for it."""
    if spec.synth is None or storage.exists(spec.root):
        return
    from shards.synth import generate

    s = spec.synth
    log.info("source %s: %s does not exist; generating synthetic %s data there", spec.name, spec.root, spec.layout)
    local = not storage.is_remote(spec.root)
    parent = os.path.dirname(os.path.abspath(spec.root)) if local else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)  # beside the root: renamed into place when complete
    try:
        out = os.path.join(tmp, "root")
        generate(spec.layout, out, classes=s.classes, normal=s.normal, abnormal=s.abnormal, size=s.size,
                 views=s.views, seed=s.seed)
        if local:
            os.replace(out, spec.root)
        else:
            fs, path = storage.filesystem(spec.root)
            with storage.storage_errors(spec.root):
                fs.put(out.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_shards(cfg: Config, progress: bool = False) -> dict[str, Any]:
    """Build (or finish, or confirm) the shards of ``cfg.sources`` under ``cfg.shards.url``.

    Returns the manifest (as written to ``{url}/manifest.json``) with one extra key,
    ``build``, holding this run's timings (also in ``build-info.json``; kept out of the
    manifest so that it stays deterministic). Idempotent: a rerun writes only what is
    missing, and nothing at all when the shards and manifest are complete.
    """
    t0 = time.time()
    url = cfg.shards.url.rstrip("/")
    manifest_url = storage.join(url, MANIFEST)
    had_manifest = storage.exists(manifest_url)  # the store answers
    writable = False

    def ensure_writable() -> None:
        nonlocal writable
        if not writable:
            storage.check_writable(url)
            writable = True

    if not had_manifest:
        ensure_writable()  # a new build: fail now, not after scanning, if it cannot be written
    for s in cfg.sources:
        _synthesize(s)
    scans = [scan_source(s) for s in cfg.sources]
    inputs = {s.spec.name: s.inputs - sum(s.ignored.values()) for s in scans}  # the budget's denominator
    scan_q = [q.to_dict() for s in scans for q in s.quarantined]
    reports = _check_budget(cfg, inputs, scan_q)
    if reports:
        raise DataError("too many bad inputs, nothing written:\n" + "\n".join(reports))

    plans = plan_build(scans, cfg.shards)
    sides: dict[str, dict] = {}
    todo: list[ShardPlan] = []
    for folder in sorted({p.folder for p in plans}):
        sizes = storage.list_sizes(storage.join(url, folder))
        for plan in (p for p in plans if p.folder == folder):
            side = committed(plan, url, sizes)
            if side is None:
                todo.append(plan)
            else:
                sides[plan.path] = side
    if todo:
        from pipeline.rayctx import init_ray

        ensure_writable()
        if had_manifest:
            storage.remove(manifest_url)  # it no longer describes what is on storage
        log.info("%d of %d shards to write (%d already committed)", len(todo), len(plans), len(plans) - len(todo))
        _clean(url, scans, plans)
        init_ray(cfg.ray)
        t_write = time.time()
        sides.update(_run_on_ray(todo, url, cfg, progress))
    else:
        _clean(url, scans, plans)
        t_write = time.time()
    t_done = time.time()

    manifest = make_manifest(cfg, scans, plans, sides)
    written_now = sum(sides[p.path]["count"] for p in todo)
    info = {
        "status": "ok",
        "seconds": round(t_done - t0, 3),
        "write_seconds": round(t_done - t_write, 3),
        "shards_written": len(todo),
        "shards_kept": len(plans) - len(todo),
        "images_written": written_now,
        "images_per_s": round(written_now / max(t_done - t_write, 1e-9), 1) if todo else None,
        "host": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    reports = _check_budget(cfg, inputs, manifest["quarantined"])
    if reports:
        failed = {**info, "status": "failed", "errors": reports, "quarantined": manifest["quarantined"]}
        ensure_writable()
        storage.write_text(storage.join(url, BUILD_INFO), _dumps(failed))
        raise DataError(
            "too many bad inputs; the shards are kept but no manifest is written:\n" + "\n".join(reports)
            + f"\nfull list: {storage.join(url, BUILD_INFO)}"
        )
    text = _dumps(manifest)
    if todo or not had_manifest or storage.read_text(manifest_url) != text:
        ensure_writable()
        storage.write_text(storage.join(url, BUILD_INFO), _dumps(info))
        storage.write_text(manifest_url, text)  # last
        t = manifest["totals"]
        log.info("wrote %s: %d shards, %d samples", manifest_url, len(plans), t["normal"] + t["abnormal"])
    else:
        log.info("%s is up to date: nothing to write", manifest_url)
    return {**manifest, "build": info}
