"""The floor of the dataset build: plan the shards of the scanned sources, tell the shards
already committed from those to write, clean what an earlier build left, make the manifest
from the shards' sidecars, and write it last.

Order of work (run by :mod:`pipeline.stages.shards`), so that a bad config, an unknown
layout or an unreachable store fails before anything is written: the output store is
reachable -> every source is scanned (layout, classes, scan-time quarantine within its
budget) -> plan -> shards already committed from the same plan are kept -> the rest are
written, one task per shard -> the invariant inputs = written + quarantined + ignored (every
file under a source root, see docs/layouts.md) and the quarantine budget are checked ->
``build-info.json`` (timings, not deterministic) -> ``manifest.json`` (deterministic, byte
for byte the same for the same inputs and settings, however often the build was interrupted).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from shards import storage
from shards.errors import DataError
from shards.manifest import BUILD_INFO, MANIFEST, MANIFEST_FORMAT
from shards.sources import SourceScan, scan_source
from shards.spec import ShardsSpec, SourceSpec
from shards.writer import ShardPlan, committed, is_temporary, plan_stream

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"shard-\d{6}\.tar(\.json)?$")
NO_CLASS = "(no class)"
"""The class row of quarantined entries that lie outside every class folder."""


# ----------------------------------------------------------------------------- the output store


class ShardStore:
    """The shards' store: its URL, its manifest's URL, and a write check made once, before the first write."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.manifest_url = storage.join(self.url, MANIFEST)
        self._writable = False

    def ensure_writable(self) -> None:
        if not self._writable:
            storage.check_writable(self.url)
            self._writable = True

    def write_json(self, name: str, obj: Any) -> None:
        self.ensure_writable()
        storage.write_text(storage.join(self.url, name), dumps(obj))


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------- planning


@dataclass
class Build:
    """What a build works from: the scans, the plan, and the sidecars of the shards already committed."""

    spec: ShardsSpec
    scans: list[SourceScan]
    inputs: dict[str, int]  # per source, the quarantine budget's denominator
    plans: list[ShardPlan]
    sides: dict[str, dict] = field(default_factory=dict)  # sidecars by shard path
    todo: list[ShardPlan] = field(default_factory=list)  # shards to write


def plan_build(scans: list[SourceScan], spec: ShardsSpec) -> list[ShardPlan]:
    """Every shard of the build, in a fixed order (source, stream, index)."""
    plans: list[ShardPlan] = []
    for scan in scans:
        for stream in ("normal", "abnormal"):
            recs = [r for r in scan.records if r.stream == stream]
            masks = None if stream == "normal" else scan.spec.masks != "none"
            plans += plan_stream(recs, spec.max_samples_per_shard, spec.max_bytes_per_shard, masks)
    return plans


def prepare(sources: list[SourceSpec], spec: ShardsSpec) -> Build:
    """Scan every source (DataError, nothing written, when one is over its quarantine budget),
    plan the shards, and sort them into committed (same plan, complete on storage) and to write."""
    scans = [scan_source(s) for s in sources]
    inputs = {s.spec.name: s.inputs - sum(s.ignored.values()) for s in scans}
    reports = check_budget(spec.max_quarantine_fraction, inputs, [q.to_dict() for s in scans for q in s.quarantined])
    if reports:
        raise DataError("too many bad inputs, nothing written:\n" + "\n".join(reports))
    build = Build(spec, scans, inputs, plan_build(scans, spec))
    url = spec.url.rstrip("/")
    for folder in sorted({p.folder for p in build.plans}):
        sizes = storage.list_sizes(storage.join(url, folder))
        for plan in (p for p in build.plans if p.folder == folder):
            side = committed(plan, url, sizes)
            if side is None:
                build.todo.append(plan)
            else:
                build.sides[plan.path] = side
    return build


def _folders(scans: list[SourceScan]) -> list[str]:
    return [f"{s.spec.name}/{s.spec.split}/{stream}" for s in scans for stream in ("normal", "abnormal")]


def clean(url: str, scans: list[SourceScan], plans: list[ShardPlan]) -> None:
    """Remove temporary files of interrupted writes and shards that are no longer planned."""
    planned = {p.path for p in plans} | {p.path + ".json" for p in plans}
    for folder in _folders(scans):
        for name in storage.listdir(storage.join(url, folder)):
            rel = f"{folder}/{name}"
            if is_temporary(name) or (_SHARD_NAME.match(name) and rel not in planned):
                log.info("removing %s (left by an earlier build)", rel)
                storage.remove(storage.join(url, rel))


# ----------------------------------------------------------------------------- quarantine budget


def _quarantine_report(source: str, entries: list[dict], inputs: int, limit: float) -> str:
    reasons = Counter(re.sub(r"\(.*", "", e["reason"]).strip() for e in entries)
    lines = [
        f"source {source!r}: {len(entries)} of {inputs} inputs quarantined "
        f"({len(entries) / max(inputs, 1):.1%} > shards.max_quarantine_fraction {limit:.1%}):"
    ]
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common(8)]
    lines += [f"  e.g. {e['path']}: {e['reason']}" for e in entries[:5]]
    return "\n".join(lines)


def check_budget(limit: float, inputs: dict[str, int], quarantined: list[dict]) -> list[str]:
    """One report per source with more than ``limit`` of its inputs quarantined."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for q in quarantined:
        by_source[q["source"]].append(q)
    return [
        _quarantine_report(name, by_source[name], n, limit)
        for name, n in inputs.items()
        if len(by_source[name]) > limit * n
    ]


# ----------------------------------------------------------------------------- manifest


@dataclass
class _Tally:
    """The counts of a manifest, gathered from the scans and the shards' sidecars."""

    quarantined: list[dict]
    shards: list[dict] = field(default_factory=list)
    rows: Counter = field(default_factory=Counter)
    per_class: dict[tuple[str, str], Counter] = field(default_factory=lambda: defaultdict(Counter))
    written_masks: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    unwritten: list = field(default_factory=list)  # records with a mask quarantined while writing

    def add_shard(self, plan: ShardPlan, side: dict) -> None:
        bad = {q["path"] for q in side["quarantined"]}
        written = [r for r in plan.records if r.path not in bad]
        if len(written) != side["count"] or len(bad) + len(written) != len(plan.records):
            raise DataError(
                f"shard {plan.path}: {side['count']} samples written and {len(bad)} quarantined do not add up to "
                f"its {len(plan.records)} inputs; delete the shard and its sidecar and rebuild"
            )
        self.shards.append({
            "path": plan.path,
            "source": plan.source,
            "split": plan.role,
            "stream": plan.stream,
            "masks": plan.masks,
            "count": side["count"],
            "bytes": side["bytes"],
            "sha256": side["sha256"],
        })
        self.quarantined += [{"source": plan.source, **q} for q in side["quarantined"]]
        self.unwritten += [r for r in plan.records if r.path in bad and r.mask_path]
        for r in written:
            self.rows[(r.source, r.cls, r.view, r.label, r.defect)] += 1
            c = self.per_class[(r.source, r.cls)]
            c["abnormal" if r.label else "normal"] += 1
            if r.mask_path:
                self.written_masks[r.source].add(r.mask_path)
            if r.label and plan.masks is False and plan.role == "pretrain":
                c["excluded_from_training"] += 1
        for cls, n in side["class_bytes"].items():
            self.per_class[(plan.source, cls)]["bytes"] += n

    def close_quarantine(self) -> None:
        """A mask of an image quarantined while writing is quarantined too (one entry per file),
        unless another written image uses it; then count and sort the quarantine."""
        accounted = {(r.source, r.mask_path) for r in self.unwritten if r.mask_path in self.written_masks[r.source]}
        for r in self.unwritten:
            if (r.source, r.mask_path) not in accounted:
                accounted.add((r.source, r.mask_path))
                self.quarantined.append({"source": r.source, "path": r.mask_path, "class": r.cls,
                                         "reason": f"mask of a quarantined image ({r.path})"})
        for q in self.quarantined:
            self.per_class[(q["source"], q["class"] or NO_CLASS)]["quarantined"] += 1
        self.quarantined.sort(key=lambda q: (q["source"], q["path"], q["reason"]))

    def source_summary(self, scan: SourceScan, mine: dict[str, Counter]) -> dict[str, int]:
        """A source's counts in files; DataError unless inputs = written + quarantined + ignored."""
        name = scan.spec.name
        normal = sum(v["normal"] for v in mine.values())
        abnormal = sum(v["abnormal"] for v in mine.values())
        masks = len(self.written_masks[name])
        summary = {
            "inputs": scan.inputs,
            "written": normal + abnormal + masks,
            "quarantined": sum(v["quarantined"] for v in mine.values()),
            "ignored": sum(scan.ignored.values()),
            "normal": normal,
            "abnormal": abnormal,
            "masks": masks,
            "excluded_from_training": sum(v["excluded_from_training"] for v in mine.values()),
            "bytes": sum(p["bytes"] for p in self.shards if p["source"] == name),
            "shards": sum(1 for p in self.shards if p["source"] == name),
        }
        if summary["inputs"] != summary["written"] + summary["quarantined"] + summary["ignored"]:
            raise DataError(
                f"source {name!r}: {summary['inputs']} inputs but {summary['written']} written + "
                f"{summary['quarantined']} quarantined + {summary['ignored']} ignored; this is a bug in the "
                "build, please report it"
            )
        return summary

    def source_entry(self, scan: SourceScan) -> dict[str, Any]:
        s = scan.spec
        mine = {k[1]: v for k, v in self.per_class.items() if k[0] == s.name}
        return {
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
            **self.source_summary(scan, mine),
        }


_TOTALS = ("inputs", "written", "quarantined", "ignored", "normal", "abnormal", "masks", "excluded_from_training",
           "shards", "bytes")


def make_manifest(
    spec: ShardsSpec, scans: list[SourceScan], plans: list[ShardPlan], sides: dict[str, dict]
) -> dict[str, Any]:
    """The manifest from the plan and the shards' sidecars; checks inputs = written + quarantined + ignored.

    The counts are in files: ``written`` is the images and masks in the shards, a mask of an
    image quarantined while writing is quarantined too (unless another written image uses it).
    """
    tally = _Tally([q.to_dict() for scan in scans for q in scan.quarantined])
    for plan in plans:
        tally.add_shard(plan, sides[plan.path])
    tally.close_quarantine()
    sources = {scan.spec.name: tally.source_entry(scan) for scan in scans}
    return {
        "format": MANIFEST_FORMAT,
        "settings": {
            "max_samples_per_shard": spec.max_samples_per_shard,
            "max_bytes_per_shard": spec.max_bytes_per_shard,
        },
        "totals": {k: sum(s[k] for s in sources.values()) for k in _TOTALS},
        "sources": sources,
        "shards": tally.shards,
        "counts": [
            {"source": s, "class": c, "view": v, "label": lab, "defect": d, "count": n}
            for (s, c, v, lab, d), n in sorted(tally.rows.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
        ],
        "quarantined": tally.quarantined,
    }


def is_current(build: Build, store: ShardStore, text: str | None = None) -> bool:
    """Nothing to write: every shard is committed and the manifest on storage is the one they
    make (``text``, when the caller has made it already)."""
    if build.todo or not storage.exists(store.manifest_url):
        return False
    if text is None:
        text = dumps(make_manifest(build.spec, build.scans, build.plans, build.sides))
    return storage.read_text(store.manifest_url) == text


def write_manifest(build: Build, store: ShardStore, manifest: dict[str, Any], info: dict[str, Any]) -> None:
    """Check the quarantine budget, then write ``build-info.json`` and, last, the manifest, unless
    it is current. Over budget: the failed build's info is written, no manifest, DataError."""
    reports = check_budget(build.spec.max_quarantine_fraction, build.inputs, manifest["quarantined"])
    if reports:
        store.write_json(BUILD_INFO, {**info, "status": "failed", "errors": reports,
                                      "quarantined": manifest["quarantined"]})
        raise DataError(
            "too many bad inputs; the shards are kept but no manifest is written:\n" + "\n".join(reports)
            + f"\nfull list: {storage.join(store.url, BUILD_INFO)}"
        )
    text = dumps(manifest)
    if is_current(build, store, text):
        log.info("%s is up to date: nothing to write", store.manifest_url)
        return
    store.write_json(BUILD_INFO, info)
    storage.write_text(store.manifest_url, text)  # last
    t = manifest["totals"]
    log.info("wrote %s: %d shards, %d samples", store.manifest_url, len(build.plans), t["normal"] + t["abnormal"])
