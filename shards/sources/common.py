"""What every reader shares: one listing of the root, candidates, and turning them into records.

A reader only knows its layout: which folders hold images, how a file's place gives its
class, split, label, defect and view, and where its mask should be. It returns
:class:`Candidate` objects (and inputs it already rejects). :func:`to_records` then applies
the checks that are the same for every layout: image extension, the file exists, the mask
of an abnormal image exists, no symlink leaves the root, keys are unique.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

from pipeline.config import SourceSpec
from pipeline.errors import DataError
from shards import storage
from shards.record import Quarantined, SampleRecord, image_ext, make_key

log = logging.getLogger(__name__)


@dataclass
class Listing:
    """Every file under a source root, listed once (paths relative to the root, '/'-separated)."""

    root: str
    files: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    _children: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    _subdirs: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add_dir(self, rel: str) -> None:
        while rel and rel not in self.dirs:
            self.dirs.add(rel)
            parent, name = posixpath.split(rel)
            self._subdirs[parent].add(name)
            rel = parent

    def add_file(self, rel: str, size: int) -> None:
        self.files[rel] = size
        parent, name = posixpath.split(rel)
        self._children[parent].append(name)
        self.add_dir(parent)

    def add_rejected(self, rel: str, reason: str) -> None:
        self.rejected[rel] = reason
        self.add_dir(posixpath.dirname(rel))

    def files_in(self, rel_dir: str) -> list[str]:
        """Names of the files directly in ``rel_dir`` (sorted)."""
        return sorted(self._children.get(rel_dir.strip("/"), []))

    def subdirs(self, rel_dir: str) -> list[str]:
        """Names of the folders directly in ``rel_dir`` (sorted)."""
        return sorted(self._subdirs.get(rel_dir.strip("/"), set()))

    def url(self, rel: str) -> str:
        return storage.join(self.root, rel)

    def top(self, limit: int = 12) -> list[str]:
        return sorted(self.subdirs("") + self.files_in(""))[:limit]


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def list_root(root: str) -> Listing:
    """List every file under ``root`` (local path or fsspec URL) in one pass.

    Symlinks are checked against the root: a link to a file inside the root is followed, a
    link that leaves the root or points to a folder is recorded in ``rejected`` with the reason.
    """
    fs, path = storage.filesystem(root)
    with storage.storage_errors(root):
        if not fs.exists(path):
            raise DataError(f"dataset root {root!r} does not exist; check the source's root in the config")
        if not fs.isdir(path):
            raise DataError(f"dataset root {root!r} is a file, not a folder; point root at the dataset folder")
        entries = fs.find(path, detail=True, withdirs=True)
    base = path.rstrip("/")
    listing = Listing(root=root.rstrip("/"))
    real_root = os.path.realpath(base) if not storage.is_remote(root) else ""
    for p, info in entries.items():
        rel = p[len(base) :].strip("/")
        if not rel or _hidden(rel):
            continue
        if info.get("islink"):
            target = os.path.realpath(p)
            if not (target == real_root or target.startswith(real_root + os.sep)):
                listing.add_rejected(rel, f"symlink pointing outside the source root (to {target})")
            elif os.path.isdir(target):
                listing.add_rejected(rel, "symlink to a folder (not followed: link files, or copy the folder)")
            else:
                listing.add_file(rel, os.stat(target).st_size if os.path.exists(target) else 0)
        elif info.get("type") == "directory":
            listing.add_dir(rel)
        else:
            listing.add_file(rel, int(info.get("size") or 0))
    return listing


@dataclass(frozen=True)
class Candidate:
    """An image a reader found at one of its layout's image positions."""

    cls: str
    split: str
    label: int
    defect: str
    path: str
    view: str | None = None
    mask: str | None = None  # where the layout says the mask is (abnormal images only)


@dataclass
class Found:
    """What a reader returns: candidates, and inputs it rejects itself (path, class, reason)."""

    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str | None, str]] = field(default_factory=list)

    def reject(self, path: str, cls: str | None, reason: str) -> None:
        self.rejected.append((path, cls, reason))


def stem(path: str) -> str:
    name = posixpath.basename(path)
    return name.rsplit(".", 1)[0] if "." in name else name


def empty_class(found: Found, cls_dir: str, cls: str, expected: str) -> None:
    """Record a selected class folder that holds no images at the layout's positions."""
    found.reject(cls_dir, cls, f"class folder has no images (expected {expected})")


def to_records(
    spec: SourceSpec, listing: Listing, found: Found, class_of_path
) -> tuple[list[SampleRecord], list[Quarantined]]:
    """Apply the checks shared by all layouts; every candidate ends as a record or a quarantine entry."""
    records: list[SampleRecord] = []
    quarantined = [Quarantined(p, spec.name, reason, cls) for p, cls, reason in found.rejected]
    seen: dict[str, str] = {}
    use_masks = spec.masks != "none"
    for c in sorted(found.candidates, key=lambda c: c.path):
        def bad(reason: str) -> None:
            quarantined.append(Quarantined(c.path, spec.name, reason, c.cls))

        if c.path in listing.rejected:
            bad(listing.rejected[c.path])
            continue
        if image_ext(c.path) is None:
            bad("not an image file (expected one of .png .jpg .jpeg .bmp .tif .tiff)")
            continue
        if c.path not in listing.files:
            bad("file is missing (listed by the dataset's split file)")
            continue
        mask_path = None
        if c.label == 1 and use_masks:
            if c.mask is None or c.mask not in listing.files:
                why = listing.rejected.get(c.mask or "", "missing")
                bad(
                    f"abnormal image without its mask ({c.mask}: {why}); for image-level-only data set "
                    "masks: none on the source"
                )
                continue
            mask_path = c.mask
        key = make_key(spec.name, c.cls, c.split, c.defect, c.view, stem(c.path))
        if key in seen:
            bad(f"duplicate key {key}: same class, split, defect, view and file stem as {seen[key]}")
            continue
        seen[key] = c.path
        records.append(
            SampleRecord(
                key=key,
                source=spec.name,
                cls=c.cls,
                view=c.view,
                split=c.split,
                role=spec.split,
                label=c.label,
                defect=c.defect,
                path=c.path,
                url=listing.url(c.path),
                size=listing.files[c.path],
                mask_path=mask_path,
                mask_url=listing.url(mask_path) if mask_path else None,
                mask_size=listing.files[mask_path] if mask_path else 0,
            )
        )
    used = {c.path for c in found.candidates} | {c.mask for c in found.candidates if c.mask}
    for rel, reason in sorted(listing.rejected.items()):
        cls = class_of_path(rel)
        if rel not in used and cls is not None:
            quarantined.append(Quarantined(rel, spec.name, reason, cls))
    return records, quarantined
