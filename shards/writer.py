"""Records -> WebDataset tar shards on an fsspec URL, each committed whole with a sidecar.

A shard is planned from sorted records (so its name and contents are the same on every
run), written to a temporary file, and committed only when complete: renamed into place
on a local disk, uploaded in one piece to an object store. Its sidecar
``shard-NNNNNN.tar.json`` is committed after it and records the sha256, sample count,
byte size, the hash of the plan it was written from, and the inputs quarantined while
writing it. A shard whose sidecar matches its plan (and whose size matches the sidecar)
is not written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable

from shards import storage
from shards.record import BadInput, SampleRecord, load_sample, read_inputs

log = logging.getLogger(__name__)

FORMAT = "adpretrain-shard/1"
TAR_OVERHEAD = 3 * 512 + 1024  # per sample: three tar headers, padding and the json (planning only)
READ_BATCH = 64  # inputs fetched at once


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: which records go into it, in which order, under which name."""

    source: str
    role: str  # pretrain | val | eval
    stream: str  # normal | abnormal
    index: int
    records: tuple[SampleRecord, ...]
    masks: bool | None  # abnormal shards: whether the samples carry masks; None for normal shards

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"

    @property
    def folder(self) -> str:
        return f"{self.source}/{self.role}/{self.stream}"

    @property
    def path(self) -> str:
        """Path relative to the output URL."""
        return f"{self.folder}/{self.name}"

    def keys_hash(self) -> str:
        """Hash of everything the shard is written from: keys, labels, input paths, sizes and change
        stamps (mtime_ns or ETag), so that an input edited in place, even to the same size, is rewritten."""
        ident = [FORMAT, self.masks, [r.identity() for r in self.records]]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def estimated_bytes(rec: SampleRecord) -> int:
    return rec.size + rec.mask_size + TAR_OVERHEAD


def plan_stream(records: list[SampleRecord], max_samples: int, max_bytes: int, masks: bool | None) -> list[ShardPlan]:
    """Chunk the records of one (source, role, stream), sorted by key, into shards.

    A shard closes when it holds ``max_samples`` records or the next one would take its
    estimated size (input bytes + tar overhead) over ``max_bytes``; a single input larger
    than ``max_bytes`` gets a shard of its own.
    """
    plans: list[ShardPlan] = []
    chunk: list[SampleRecord] = []
    size = 0
    for rec in sorted(records, key=lambda r: r.key):
        est = estimated_bytes(rec)
        if chunk and (len(chunk) >= max_samples or size + est > max_bytes):
            plans.append(_plan(chunk, len(plans), masks))
            chunk, size = [], 0
        chunk.append(rec)
        size += est
    if chunk:
        plans.append(_plan(chunk, len(plans), masks))
    return plans


def _plan(chunk: list[SampleRecord], index: int, masks: bool | None) -> ShardPlan:
    r = chunk[0]
    return ShardPlan(r.source, r.role, r.stream, index, tuple(chunk), masks)


def _tar_member(name: str, data: bytes) -> bytes:
    """One tar member (GNU format): header, data, padding to the 512-byte block.

    The metadata is fixed, so the same samples always give the same bytes (and sha256).
    """
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    header = ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _tar_end(size: int) -> bytes:
    """The end of a tar archive of ``size`` bytes so far: two zero blocks, then padding to the record size."""
    size += 2 * tarfile.BLOCKSIZE
    return bytes(2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE))


class _Hashing:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, f) -> None:
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        self.f.write(data)


def _samples(plan: ShardPlan, quarantined: list[dict[str, Any]]) -> Iterable:
    """The checked samples of a plan, in order; bad inputs are appended to ``quarantined``."""
    records = plan.records
    for start in range(0, len(records), READ_BATCH):
        batch = records[start : start + READ_BATCH]
        urls = [u for r in batch for u in (r.url, r.mask_url) if u is not None]
        got = read_inputs(urls)
        for rec in batch:
            try:
                yield load_sample(rec, got[rec.url], got[rec.mask_url] if rec.mask_url else None)
            except BadInput as e:
                quarantined.append({"path": rec.path, "class": rec.cls, "reason": str(e)})


def sidecar_url(url: str, plan: ShardPlan) -> str:
    return storage.join(url, plan.path + ".json")


def write_shard(plan: ShardPlan, url: str) -> dict[str, Any]:
    """Write and commit one shard and its sidecar; returns the sidecar's content."""
    target = storage.join(url, plan.path)
    local = not storage.is_remote(url)
    tmp_dir = os.path.dirname(storage.filesystem(target)[1]) if local else None
    if tmp_dir:
        os.makedirs(tmp_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{plan.name}.", suffix=".tmp", dir=tmp_dir)
    quarantined: list[dict[str, Any]] = []
    class_bytes: dict[str, int] = {}
    count = 0
    try:
        with os.fdopen(fd, "wb") as f:
            raw = _Hashing(f)
            for sample in _samples(plan, quarantined):
                raw.write(b"".join(_tar_member(name, data) for name, data in sample.members))
                count += 1
                cls = sample.meta["class"]
                class_bytes[cls] = class_bytes.get(cls, 0) + sample.nbytes
            raw.write(_tar_end(raw.size))
            f.flush()
            os.fsync(f.fileno())
        side = {
            "format": FORMAT,
            "keys_hash": plan.keys_hash(),
            "sha256": raw.sha256.hexdigest(),
            "count": count,
            "bytes": raw.size,
            "class_bytes": dict(sorted(class_bytes.items())),
            "quarantined": quarantined,
        }
        storage.put_file(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    storage.write_text(sidecar_url(url, plan), json.dumps(side, sort_keys=True, indent=1))
    log.debug("committed %s: %d samples, %d quarantined", target, count, len(quarantined))
    return side


def committed(plan: ShardPlan, url: str, sizes: dict[str, int]) -> dict[str, Any] | None:
    """The sidecar of a shard already committed from this plan, or None when it must be (re)written.

    ``sizes`` maps the names in the shard's folder to their sizes (one listing per folder).
    """
    if plan.name not in sizes or plan.name + ".json" not in sizes:
        return None
    try:
        side = json.loads(storage.read_text(sidecar_url(url, plan)))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(side, dict) or side.get("format") != FORMAT or side.get("keys_hash") != plan.keys_hash():
        return None
    if side.get("bytes") != sizes[plan.name]:
        return None
    return side


def is_temporary(name: str) -> bool:
    """A temporary file left by an interrupted write."""
    return (name.startswith(".shard-") and name.endswith(".tmp")) or ".tmp-" in name
