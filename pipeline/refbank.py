"""The reference bank's storage: one fp16 safetensors file per (source, class, view) group.

:class:`RefBankStore` writes, lists, checks and reads the bank on a local path or object
store (``{shards.url}/refbank/<backbone-id>-<digest>``, :mod:`pipeline.paths`), with a bounded
LRU cache of loaded groups, and draws a group's references (:func:`pipeline.matching.pick_references`).
Which images enter the bank is the refbank stage's (:mod:`pipeline.stages.refbank`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from pipeline import levels
from pipeline.matching import pick_references
from shards import storage
from shards.errors import DataError, UserError

log = logging.getLogger(__name__)


def group_file(group: str) -> str:
    """Filesystem-safe, collision-free file name of a group id such as ``source/class/view``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", group).strip("._") or "group"
    return f"{safe}-{hashlib.sha256(group.encode()).hexdigest()[:8]}.safetensors"


class RefBankStore:
    """Reference-bank features on a local path or object store, with a bounded LRU cache.

    Layout: ``{url}/groups/<group-file>.safetensors`` (fp16 ``level<i>`` tensors (M, C_l, h, w),
    metadata: group id and image keys) and ``{url}/manifest.json``, written last, listing every
    group with its file size. The bank is complete when the manifest exists and every group
    file it lists is present with that size.
    """

    MANIFEST = "manifest.json"

    def __init__(self, url: str, cache_groups: int = 256) -> None:
        if cache_groups < 1:
            raise ValueError(f"cache_groups must be >= 1, got {cache_groups}")
        self.url = url.rstrip("/")
        self.cache_groups = cache_groups
        self._manifest: dict | None = None
        self._cache: OrderedDict[str, list[Tensor]] = OrderedDict()

    def _groups_url(self) -> str:
        return storage.join(self.url, "groups")

    def write_group(self, group: str, feats: list[Tensor], image_keys: list[str]) -> None:
        """Store one group's (M, C_l, h, w) features per level as fp16, atomically."""
        if not feats or any(f.dim() != 4 or f.shape[0] != len(image_keys) for f in feats):
            raise ValueError(
                f"group {group!r}: every level must be (M={len(image_keys)}, C, h, w), got {[tuple(f.shape) for f in feats]}"
            )
        tensors = levels.by_name([f.detach().to("cpu", torch.float16).contiguous() for f in feats])
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"group {group!r}: {name} has values that are not finite in fp16 (|x| > 65504?)")
        info = {"group": group, "image_keys": json.dumps(list(image_keys))}
        storage.write_bytes(storage.join(self._groups_url(), group_file(group)), st_save(tensors, metadata=info))

    def _listing(self) -> dict[str, int]:
        """File name -> size of the group files present."""
        fs, path = storage.filesystem(self._groups_url())
        with storage.storage_errors(self._groups_url()):
            if not fs.exists(path):
                return {}
            entries = fs.ls(path, detail=True)
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"])
            for e in entries
            if e["name"].endswith(".safetensors")
        }

    def _header(self, name: str) -> tuple[dict[str, str], dict[str, Any]]:
        """(metadata, tensor entries) from a group file's safetensors header, without its data."""
        url = storage.join(self._groups_url(), name)
        with storage.storage_errors(url):
            with storage.open_read(url) as f:
                return levels.read_header(f)

    def write_manifest(self, meta: dict) -> None:
        """List every group file now present and write the manifest (last, atomically)."""
        groups: dict[str, dict] = {}
        widths: list[int] | None = None
        for name, size in sorted(self._listing().items()):
            info, entries = self._header(name)
            shapes = [e["shape"] for e in levels.in_order(entries)]
            w = [s[1] for s in shapes]
            if widths is not None and w != widths:
                raise DataError(f"reference bank {self.url}: group file {name} has widths {w}, others {widths}")
            widths = w
            groups[info["group"]] = {
                "file": name,
                "bytes": size,
                "images": shapes[0][0],
                "image_keys": json.loads(info["image_keys"]),
            }
        if not groups:
            raise DataError(f"reference bank {self.url}: no group was written, nothing to list in a manifest")
        manifest = {"format": 1, "widths": widths, "groups": groups, "meta": meta}
        storage.write_text(storage.join(self.url, self.MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        self._manifest = manifest
        log.info("reference bank manifest: %d groups at %s", len(groups), self.url)

    def _read_manifest(self) -> dict | None:
        url = storage.join(self.url, self.MANIFEST)
        if not storage.exists(url):
            return None
        try:
            return json.loads(storage.read_text(url))
        except json.JSONDecodeError as e:
            raise DataError(f"reference bank manifest {url!r} is not valid JSON ({e}); rerun `adpretrain refbank`") from None

    def exists(self) -> bool:
        """True when the manifest is present and every group file it lists is there, complete."""
        manifest = self._read_manifest()
        if manifest is None:
            return False
        present = self._listing()
        complete = all(present.get(g["file"]) == g["bytes"] for g in manifest["groups"].values())
        if complete:
            self._manifest = manifest
        return complete

    def manifest(self) -> dict:
        """The manifest (cached after the first read)."""
        if self._manifest is None:
            self._manifest = self._read_manifest()
            if self._manifest is None:
                raise UserError(f"no reference bank at {self.url!r}: run `adpretrain refbank CONFIG` first")
        return self._manifest

    def groups(self) -> list[str]:
        return sorted(self.manifest()["groups"])

    def load(self, group: str) -> list[Tensor]:
        """The group's fp16 (M, C_l, h, w) features per level; cached (LRU, ``cache_groups`` groups).

        The returned tensors are shared with the cache: do not modify them in place.
        """
        hit = self._cache.get(group)
        if hit is not None:
            self._cache.move_to_end(group)
            return hit
        entry = self.manifest()["groups"].get(group)
        if entry is None:
            known = self.groups()
            raise UserError(
                f"group {group!r} is not in the reference bank at {self.url!r} ({len(known)} groups, e.g. {known[:5]}); "
                "rebuild the bank for the current shards (`adpretrain refbank CONFIG`)"
            )
        data = storage.read_bytes(storage.join(self._groups_url(), entry["file"]))
        feats = levels.in_order(st_load(data))
        self._cache[group] = feats
        if len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return feats

    def draw(self, group: str, k: int, generator: torch.Generator, exclude: str | None = None) -> list[Tensor]:
        """``k`` distinct images of ``group`` drawn with ``generator``; per level (k*h*w, C_l) float32.
        ``exclude``: an image key never drawn (a sample is not its own reference)."""
        feats = self.load(group)
        pick = pick_references(self.manifest()["groups"][group]["image_keys"], k, generator, exclude,
                               f"group {group!r} of the bank at {self.url!r}")
        return [f[pick].permute(0, 2, 3, 1).reshape(-1, f.shape[1]).float() for f in feats]
