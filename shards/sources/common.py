"""What every reader shares: one listing of the root, candidates, and the accounting of every file.

A reader only knows its layout: which folders hold images, how a file's place gives its
class, split, label, defect and view, and where its mask should be. It returns
:class:`Candidate` objects (and inputs it already rejects). :func:`to_records` then applies
the checks that are the same for every layout (image extension, the file exists, the mask
of an abnormal image exists, no symlink leaves the root, keys are unique) and accounts for
every other entry of the listing: each file under the root is read (an image or its mask),
quarantined with a reason, or ignored by one of the rules in docs/layouts.md (and counted).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

from shards.spec import SourceSpec
from shards.errors import DataError
from shards import storage
from shards.record import Quarantined, SampleRecord, file_kind, image_ext, make_key

log = logging.getLogger(__name__)


@dataclass
class Listing:
    """Every entry under a source root that is not a folder, listed once (paths relative to
    the root, '/'-separated): regular files (size and a change stamp), entries that are not
    read (with the reason) and hidden entries."""

    root: str
    files: dict[str, int] = field(default_factory=dict)
    stamps: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)
    dirs: set[str] = field(default_factory=set)
    _children: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    _subdirs: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add_dir(self, rel: str) -> None:
        while rel and rel not in self.dirs:
            self.dirs.add(rel)
            parent, name = posixpath.split(rel)
            self._subdirs[parent].add(name)
            rel = parent

    def add_file(self, rel: str, size: int, stamp: str) -> None:
        self.files[rel] = size
        self.stamps[rel] = stamp
        parent, name = posixpath.split(rel)
        self._children[parent].append(name)
        self.add_dir(parent)

    def add_rejected(self, rel: str, reason: str) -> None:
        self.rejected[rel] = reason
        self.add_dir(posixpath.dirname(rel))

    def add(self, rel: str, kind: str, size: int = 0, stamp: str = "") -> None:
        """One entry: kind ``directory``, ``file``, or the reason it is not read."""
        if _hidden(rel):
            if kind != "directory":
                self.hidden.append(rel)
        elif kind == "directory":
            self.add_dir(rel)
        elif kind == "file":
            self.add_file(rel, size, stamp)
        else:
            self.add_rejected(rel, kind)

    @property
    def entries(self) -> int:
        return len(self.files) + len(self.rejected) + len(self.hidden)

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


def _local_entry(path: str, real_root: str) -> tuple[str, int, str]:
    """(kind, size, stamp) of one local entry, from lstat (and stat of a link's target): nothing is opened."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return "directory", 0, ""
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if not (target == real_root or target.startswith(real_root + os.sep)):
            return f"symlink pointing outside the source root (to {target})", 0, ""
        try:
            st = os.stat(path)
        except OSError as e:
            return f"broken symlink (to {target}: {e.strerror})", 0, ""
        if stat.S_ISDIR(st.st_mode):
            return "symlink to a folder (not followed: link files, or copy the folder)", 0, ""
        kind = file_kind(st.st_mode)
        if kind:
            return f"symlink to a {kind}, not a regular file (never opened)", 0, ""
    else:
        kind = file_kind(st.st_mode)
        if kind:
            return f"{kind}, not a regular file (never opened)", 0, ""
    return "file", st.st_size, str(st.st_mtime_ns)


def _raise(err: OSError) -> None:
    raise err  # a folder that cannot be listed: its files would go uncounted


def list_root(root: str) -> Listing:
    """List every entry under ``root`` (local path or fsspec URL) in one pass.

    Local entries are classified by lstat before anything is opened: regular files (and
    symlinks to regular files inside the root) are listed with their size and mtime_ns;
    FIFOs, sockets, devices, broken symlinks, symlinks leaving the root or pointing to a
    folder are recorded in ``rejected`` with the reason. Objects of a store are files,
    stamped with their ETag (or LastModified).
    """
    fs, path = storage.filesystem(root)
    base = path.rstrip("/")
    listing = Listing(root=root.rstrip("/"))
    with storage.storage_errors(root):
        if not fs.exists(path):
            raise DataError(f"dataset root {root!r} does not exist; check the source's root in the config")
        if not fs.isdir(path):
            raise DataError(f"dataset root {root!r} is a file, not a folder; point root at the dataset folder")
        if storage.is_remote(root):
            for p, info in fs.find(path, detail=True, withdirs=True).items():
                rel = p[len(base) :].strip("/")
                if rel:
                    stamp = str(info.get("ETag") or info.get("LastModified") or "")
                    kind = "directory" if info.get("type") == "directory" else "file"
                    listing.add(rel, kind, int(info.get("size") or 0), stamp)
        else:
            real_root = os.path.realpath(base)
            for folder, dirs, names in os.walk(base, onerror=_raise):
                for name in dirs + names:
                    full = os.path.join(folder, name)
                    rel = os.path.relpath(full, base).replace(os.sep, "/")
                    listing.add(rel, *_local_entry(full, real_root))
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
    mask: str | None = None  # where the layout says the image's mask is


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


def scan_classes(
    listing: Listing, classes: list[str], expected: str, scan_class: Callable[[Listing, str, Found], None]
) -> Found:
    """The scan of a layout whose class folders lie in the root: ``scan_class`` (the layout's
    rule) adds the candidates of one class; a class folder where it finds none is rejected."""
    found = Found()
    for cls in classes:
        n = len(found.candidates)
        scan_class(listing, cls, found)
        if len(found.candidates) == n:
            empty_class(found, cls, cls, expected)
    return found


@dataclass
class Accounted:
    """Every entry of a source's listing: records to write, quarantined inputs, ignored files by rule."""

    records: list[SampleRecord]
    quarantined: list[Quarantined]
    ignored: Counter
    inputs: int


class _Layout:
    """What :func:`to_records` needs to know of a layout besides its candidates."""

    def __init__(self, name: str, reader, classes: list[str], available: list[str]) -> None:
        self.name, self.expected, self.masks = name, reader.EXPECTED, reader.MASKS
        self.not_read = getattr(reader, "NOT_READ", ())
        self.prefix = [p for p in reader.CLASS_DIR.split("/") if p]
        self.selected, self.unselected = set(classes), set(available) - set(classes)

    def class_folder(self, rel: str) -> str | None:
        """The class folder a path lies in (None outside the class folders)."""
        parts = rel.split("/")
        n = len(self.prefix)
        return parts[n] if parts[:n] == self.prefix and len(parts) > n + 1 else None

    def where(self, rel: str) -> str:
        """The folder of ``rel``, written ``<class>/...`` when it lies in a selected class folder."""
        parts = rel.split("/")[:-1]
        if self.class_folder(rel) in self.selected:
            parts = [*self.prefix, "<class>", *parts[len(self.prefix) + 1 :]]
        return "/".join(parts) + "/" if parts else "the root folder"


def to_records(
    spec: SourceSpec, listing: Listing, found: Found, reader, classes: list[str], available: list[str]
) -> Accounted:
    """Apply the checks shared by all layouts; every entry of the listing ends as (part of) a
    record, a quarantine entry or an ignored file, and ``inputs`` counts them all."""
    records, quarantined = _check_candidates(spec, listing, found)
    layout = _Layout(spec.layout, reader, classes, available)
    ignored, claims = _account(spec, listing, found, layout, records, quarantined)
    return Accounted(records, quarantined, ignored, listing.entries + claims)


def _check_candidates(
    spec: SourceSpec, listing: Listing, found: Found
) -> tuple[list[SampleRecord], list[Quarantined]]:
    """Every candidate ends as a record or a quarantine entry (and so does every input the reader rejected)."""
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
                stamp=listing.stamps[c.path],
                mask_path=mask_path,
                mask_url=listing.url(mask_path) if mask_path else None,
                mask_size=listing.files[mask_path] if mask_path else 0,
                mask_stamp=listing.stamps[mask_path] if mask_path else "",
            )
        )
    return records, quarantined


def _account(
    spec: SourceSpec, listing: Listing, found: Found, layout: _Layout, records: list[SampleRecord],
    quarantined: list[Quarantined],
) -> tuple[Counter, int]:
    """Quarantine or ignore every entry no record or quarantine entry owns: (ignored by rule, claims).

    Claims are the quarantine entries without a file of their own (a listed file that is
    missing, a row listed twice, an empty class folder).
    """
    owned = {r.path for r in records} | {r.mask_path for r in records if r.mask_path}
    entries = set(listing.files) | set(listing.rejected) | set(listing.hidden)
    claims = 0
    for q in quarantined:
        if q.path in entries and q.path not in owned:
            owned.add(q.path)
        else:
            claims += 1
    mask_of: dict[str, list[Candidate]] = defaultdict(list)
    for c in found.candidates:
        if c.mask:
            mask_of[c.mask].append(c)
    hidden = set(listing.hidden)
    use_masks = spec.masks != "none"
    ignored: Counter = Counter()
    for rel in sorted(entries - owned):
        cls = layout.class_folder(rel)
        in_class = cls if cls in layout.selected else None
        rule = _ignore_rule(rel, hidden, layout, listing, mask_of, use_masks)
        if rule:
            ignored[rule] += 1
        elif rel in listing.rejected:
            quarantined.append(Quarantined(rel, spec.name, listing.rejected[rel], in_class))
        elif rel in mask_of:
            images = ", ".join(c.path for c in mask_of[rel])
            quarantined.append(Quarantined(rel, spec.name, f"mask of a quarantined image ({images})", in_class))
        elif _matches(rel, layout.masks):
            quarantined.append(Quarantined(
                rel, spec.name, f"not the mask of any image: an orphan mask, or its name does not match its "
                f"image's (expected {layout.expected})", in_class))
        else:
            quarantined.append(Quarantined(
                rel, spec.name, f"unexpected location for layout {layout.name}: {layout.where(rel)} "
                f"(expected {layout.expected})", in_class))
    return ignored, claims


def _matches(rel: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)  # "*" also matches "/"


def _ignore_rule(rel: str, hidden: set[str], layout: _Layout, listing: Listing, mask_of, use_masks: bool) -> str | None:
    """The documented rule (docs/layouts.md) under which an unread entry is ignored, or None."""
    if rel in hidden:
        return "hidden files"
    if layout.class_folder(rel) in layout.unselected:
        return "classes not selected"
    if rel in listing.rejected:
        return None
    if rel in mask_of and all(c.label == 0 for c in mask_of[rel]):
        return "masks of normal images (not read)"
    if not use_masks and (rel in mask_of or _matches(rel, layout.masks)):
        return "masks (masks: none)"
    for pattern, rule in layout.not_read:
        if _matches(rel, [pattern]):
            return rule
    if "/" not in rel and image_ext(rel) is None:
        return "non-image files in the root (readme, license)"
    return None
