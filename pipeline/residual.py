"""Residual features (METHOD.md §2): nearest-normal matching, centers, and the reference bank.

- :func:`match_residual`: for every patch feature, the reference vector of highest cosine
  similarity; residual = feature - that raw vector. Chunked over query patches, so the
  similarity block held at once is at most ``chunk x P``.
- :class:`CenterAccumulator`: per-level sum and count of normal residuals, merged from
  other processes; mean = the centers.
- :class:`RefBankStore`: the reference bank next to the shards (``{shards.url}/refbank/<backbone-id>``),
  one fp16 safetensors file per (source, class, view) group and a manifest written last.

The same functions serve training (references drawn from the bank per step) and downstream
evaluation (a fixed K-shot reference set as a ``(1, P, C)`` bank).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from shards.errors import DataError, UserError
from shards import storage

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- matching


def _check_bank(feat: Tensor, bank: Tensor, chunk: int) -> None:
    if feat.dim() != 4:
        raise ValueError(f"feat must be (B, C, h, w), got {tuple(feat.shape)}")
    if bank.dim() != 3 or bank.shape[0] not in (1, feat.shape[0]) or bank.shape[2] != feat.shape[1]:
        raise ValueError(f"bank must be (B or 1, P, C={feat.shape[1]}) for feat {tuple(feat.shape)}, got {tuple(bank.shape)}")
    if bank.shape[1] == 0:
        raise ValueError("bank holds no reference vectors")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


@torch.no_grad()
def nearest_index(feat: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    """(B, h*w) index into the bank's P vectors of the highest cosine similarity per patch.

    ``feat`` (B, C, h, w); ``bank`` (B, P, C) per sample, or (1, P, C) shared by the batch.
    At most ``chunk`` query patches are compared at a time (a chunk x P block, in float32 or
    wider). The query's own norm does not change the argmax, so only the bank's norms are
    divided out: no normalised copy of the features or the bank is made. Ties go to the
    lowest index.
    """
    _check_bank(feat, bank, chunk)
    b, c, h, w = feat.shape
    n = h * w
    dt = torch.promote_types(torch.promote_types(feat.dtype, bank.dtype), torch.float32)
    q = feat.to(dt).flatten(2).transpose(1, 2)  # (B, N, C), a view
    ref = bank.to(dt)
    inv = ref.norm(dim=-1).clamp_min(1e-12).reciprocal()  # (B or 1, P)
    shared = ref.shape[0] == 1
    idx = torch.empty(b, n, dtype=torch.long, device=feat.device)
    step = min(chunk, n)  # query patches of one sample per block
    per = max(1, chunk // n)  # samples per block when whole samples fit in a chunk
    for s in range(0, b, per):
        ref_t = ref[0].T if shared else ref[s : s + per].transpose(1, 2)
        scale = inv[0] if shared else inv[s : s + per, None, :]
        for i in range(0, n, step):
            # one expression: the previous block is freed before the next is allocated
            idx[s : s + per, i : i + step] = torch.matmul(q[s : s + per, i : i + step], ref_t).mul_(scale).argmax(-1)
    return idx


def match_residual(feat: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    """Residual (B, C, h, w) = feat - the bank vector (raw, not normalised) nearest in cosine."""
    idx = nearest_index(feat, bank, chunk)
    b, c, h, w = feat.shape
    src = bank.expand(b, -1, -1) if bank.shape[0] == 1 else bank
    matched = torch.gather(src.transpose(1, 2), 2, idx.unsqueeze(1).expand(-1, c, -1))  # (B, C, N)
    # feat - matched, computed in the gathered tensor: no second buffer the size of the features
    return matched.to(feat.dtype).neg_().add_(feat.reshape(b, c, h * w)).reshape(b, c, h, w)


# ----------------------------------------------------------------------------- centers


class CenterAccumulator:
    """Per-level float64 sum and count of the residuals of normal patches.

    ``add`` per batch, ``merge`` the sums and counts returned by other processes, then ``centers``.
    """

    def __init__(self, widths: list[int]) -> None:
        self.widths = list(widths)
        self.sums = [torch.zeros(c, dtype=torch.float64) for c in self.widths]
        self.counts = torch.zeros(len(self.widths), dtype=torch.float64)

    def add(self, level_residuals: list[Tensor], normal_mask: list[Tensor]) -> None:
        """Add (B, C_l, h, w) residuals where the (B, h, w) boolean mask is True (normal patches)."""
        if len(level_residuals) != len(self.widths) or len(normal_mask) != len(self.widths):
            raise ValueError(
                f"expected {len(self.widths)} levels, got {len(level_residuals)} residuals and {len(normal_mask)} masks"
            )
        for lv, (r, m) in enumerate(zip(level_residuals, normal_mask)):
            b, c, h, w = r.shape
            if c != self.widths[lv] or tuple(m.shape) != (b, h, w):
                raise ValueError(
                    f"level {lv}: residual {tuple(r.shape)} (width {self.widths[lv]} expected) "
                    f"and mask {tuple(m.shape)} do not fit"
                )
            m = m.to(device=r.device, dtype=torch.bool)
            self.sums[lv] += r.detach().permute(0, 2, 3, 1)[m].double().sum(0).cpu()
            self.counts[lv] += float(m.sum())

    def merge(self, sums: list[Tensor], counts: Tensor) -> None:
        """Add another accumulator's ``sums`` and ``counts``."""
        if len(sums) != len(self.sums) or any(s.shape != t.shape for s, t in zip(sums, self.sums)):
            raise ValueError(f"cannot merge sums of shapes {[tuple(s.shape) for s in sums]} into widths {self.widths}")
        for lv, s in enumerate(sums):
            self.sums[lv] += s.double().cpu()
        self.counts += counts.double().cpu()

    def centers(self) -> list[Tensor]:
        """Mean normal residual per level, float32 (C_l,)."""
        empty = [lv for lv, n in enumerate(self.counts.tolist()) if n == 0]
        if empty:
            raise DataError(f"no normal patches were seen for levels {empty}: the centers need normal images")
        return [(s / n).float() for s, n in zip(self.sums, self.counts.tolist())]


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (header: u64 little-endian length, then JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def save_centers(url: str, centers: list[Tensor], backbone_id: str, meta: dict) -> None:
    """Store centers as safetensors (``level_<i>``) with the backbone id and ``meta``; atomic write."""
    tensors = {f"level_{i}": c.detach().float().cpu().contiguous() for i, c in enumerate(centers)}
    info = {"backbone_id": backbone_id, "levels": str(len(centers)), "meta": json.dumps(meta, sort_keys=True)}
    storage.write_bytes(url, st_save(tensors, metadata=info))


def load_centers(url: str, backbone_id: str | None = None) -> tuple[list[Tensor], dict]:
    """Centers and their meta (with ``backbone_id``); a given ``backbone_id`` must match the stored one."""
    if not storage.exists(url):
        raise UserError(f"no centers at {url!r}: run `adpretrain centers CONFIG` first")
    data = storage.read_bytes(url)
    try:
        tensors, info = st_load(data), _safetensors_metadata(data)
        centers = [tensors[f"level_{i}"] for i in range(int(info["levels"]))]
        meta = json.loads(info["meta"])
    except Exception as e:  # a truncated or foreign file fails in safetensors, struct or json
        raise UserError(f"centers file {url!r} cannot be read ({type(e).__name__}: {e}); rerun `adpretrain centers`") from None
    if backbone_id is not None and info["backbone_id"] != backbone_id:
        raise UserError(
            f"centers at {url!r} belong to backbone {info['backbone_id']!r}, not {backbone_id!r}; "
            "compute them for this backbone with `adpretrain centers CONFIG`"
        )
    meta["backbone_id"] = info["backbone_id"]
    return centers, meta


# ----------------------------------------------------------------------------- reference bank


def group_file(group: str) -> str:
    """Filesystem-safe, collision-free file name of a group id such as ``source/class/view``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", group).strip("._") or "group"
    return f"{safe}-{hashlib.sha256(group.encode()).hexdigest()[:8]}.safetensors"


class RefBankStore:
    """Reference-bank features on a local path or object store, with a bounded LRU cache.

    Layout: ``{url}/groups/<group-file>.safetensors`` (fp16 ``level_<i>`` tensors (M, C_l, h, w),
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
        tensors = {f"level_{i}": f.detach().to("cpu", torch.float16).contiguous() for i, f in enumerate(feats)}
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
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        return header.pop("__metadata__", {}), header

    def write_manifest(self, meta: dict) -> None:
        """List every group file now present and write the manifest (last, atomically)."""
        groups: dict[str, dict] = {}
        widths: list[int] | None = None
        for name, size in sorted(self._listing().items()):
            info, entries = self._header(name)
            shapes = [entries[f"level_{i}"]["shape"] for i in range(len(entries))]
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
        tensors = st_load(data)
        feats = [tensors[f"level_{i}"] for i in range(len(tensors))]
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


def pick_references(keys: list[str], k: int, generator: torch.Generator, exclude: str | None, where: str) -> Tensor:
    """Indices of ``k`` distinct images among ``keys`` drawn with ``generator``, never ``exclude``."""
    allowed = torch.tensor([i for i, key in enumerate(keys) if key != exclude], dtype=torch.long)
    if not 1 <= k <= len(allowed):
        raise UserError(
            f"cannot draw {k} references from {where}: it has {len(allowed)} other than the sample; "
            "raise refbank.per_group above the largest K"
        )
    return allowed[torch.randperm(len(allowed), generator=generator)[:k]]
