"""The shard manifest: where it lies, reading it, its digest, and which shards it lists.

``manifest.json`` at the root of the shard set lists every committed shard (source, split,
stream, class, count, bytes), the counts per source and class, and the quarantined and
ignored inputs; :mod:`shards.build` writes it. Every reader asks this module for it, for the
URLs of a source/split/stream and for their counts, and checks the shards it reads against
it (:func:`check_shard_sizes`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

from shards import storage
from shards.errors import DataError

MANIFEST = "manifest.json"
BUILD_INFO = "build-info.json"
MANIFEST_FORMAT = "adpretrain-manifest/1"


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest of the shards under ``url``; DataError when there is none."""
    murl = storage.join(url, MANIFEST)
    try:
        text = storage.read_text(murl)
    except FileNotFoundError:
        raise DataError(f"no shards at {url!r} ({MANIFEST} is missing): run `adpretrain build-shards CONFIG`") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise DataError(f"{murl!r} is not valid JSON ({e}): run `adpretrain build-shards CONFIG` again") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{murl!r} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}: rebuild it")
    return manifest


def manifest_sha256(url: str) -> str:
    """sha256 of the bytes of the shard manifest under ``url``."""
    read_manifest(url)  # a clear error when there are no shards
    return hashlib.sha256(storage.read_bytes(storage.join(url, MANIFEST))).hexdigest()


def shard_urls(
    manifest: dict,
    url: str,
    *,
    source: str | None = None,
    split: str | None = None,
    stream: str | None = None,
) -> list[str]:
    """Full URLs of the committed shards matching the filters, in manifest order.

    Abnormal shards of a pretraining source with ``masks: none`` are never returned for
    split "pretrain": the training streams leave them out (the manifest counts them as
    ``excluded_from_training``). Empty selections are returned as [].
    """
    out = []
    for s in manifest["shards"]:
        if (source and s["source"] != source) or (split and s["split"] != split) or (stream and s["stream"] != stream):
            continue
        if s["split"] == "pretrain" and s["masks"] is False:
            continue
        out.append(storage.join(url, s["path"]))
    return out


def shard_counts(manifest: dict, url: str, **filters: str | None) -> dict[str, int]:
    """URL -> sample count of the shards :func:`shard_urls` selects with the same filters."""
    counts = {storage.join(url, s["path"]): s["count"] for s in manifest["shards"]}
    return {u: counts[u] for u in shard_urls(manifest, url, **filters)}


def check_shard_sizes(manifest: dict, base_url: str, urls: list[str]) -> None:
    """Every shard of ``urls`` (under ``base_url``) is present with the size ``manifest`` gives it;
    else one DataError naming the shards that differ. One listing per shard folder."""
    expected = {storage.join(base_url, s["path"]): s.get("bytes") for s in manifest["shards"]}
    names: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        folder, _, name = url.rpartition("/")
        names[folder].append(name)
    bad = []
    for folder, wanted in names.items():
        sizes = storage.list_sizes(folder)
        for name in wanted:
            url, got = f"{folder}/{name}", sizes.get(name)
            if url not in expected:
                bad.append(f"{url} (not in the manifest)")
            elif got != expected[url]:
                bad.append(f"{url} ({'missing' if got is None else f'{got} bytes'}, the manifest says {expected[url]})")
    if bad:
        raise DataError(
            f"{len(bad)} shard(s) under {base_url} differ from the manifest: {'; '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}. Rerun `adpretrain build-shards CONFIG` to rewrite them"
        )


def summary_table(manifest: dict) -> str:
    """Per source and class: normal, abnormal, quarantined, MB; totals, the count of every input file, images/s."""
    head = ("source", "class", "normal", "abnormal", "quarantined", "MB")
    rows = []
    for name, src in sorted(manifest["sources"].items()):
        for cls, c in sorted(src["classes"].items()):
            rows.append((name, cls, c["normal"], c["abnormal"], c["quarantined"], f"{c['bytes'] / 1e6:.1f}"))
    t = manifest["totals"]
    mb = sum(c["bytes"] for src in manifest["sources"].values() for c in src["classes"].values()) / 1e6
    rows.append(("total", "", t["normal"], t["abnormal"], t["quarantined"], f"{mb:.1f}"))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r) -> str:
        return "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    out = [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[:-1]]
    out += ["  ".join("-" * w for w in widths), line(rows[-1])]
    out.append(
        f"{t['shards']} shards ({t['bytes'] / 1e6:.1f} MB); files under the source roots: "
        f"{t['inputs']} inputs = {t['written']} written + {t['quarantined']} quarantined + {t['ignored']} ignored "
        f"(written: {t['normal'] + t['abnormal']} images, {t['masks']} masks)"
    )
    if t["excluded_from_training"]:
        out.append(f"{t['excluded_from_training']} abnormal samples without masks are left out of the training streams")
    build = manifest.get("build")
    if build:
        speed = f", {build['images_per_s']:.0f} images/s" if build.get("images_per_s") else ""
        out.append(
            f"this run: {build['shards_written']} shards written, {build['shards_kept']} kept, "
            f"{build['seconds']:.1f} s{speed}"
        )
    return "\n".join(out)
