"""Source readers, one per on-disk layout, and :func:`scan_source` that runs the right one.

Each layout module exposes ``EXPECTED`` (the layout in one line, for error messages),
``CLASS_DIR`` (the folder that holds the class folders), ``scan(listing, classes, masks) ->
Found`` (the paths it consumes; the layouts whose class folders lie in the root share
:func:`shards.sources.common.scan_classes`), ``MASKS`` (glob patterns of where its masks lie)
and, optionally, ``find_classes(listing)`` (when not every folder in ``CLASS_DIR`` is a
class) and ``NOT_READ`` (glob patterns of the files the layout documents as not read, with
the rule's name). Everything else under the root is accounted for in one place,
:func:`shards.sources.common.to_records`. See docs/layouts.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from types import ModuleType

from shards.spec import SourceSpec
from shards.errors import DataError
from shards.record import Quarantined, SampleRecord
from shards.sources import btad, folder, mvtec, mvtec3d, realiad, visa
from shards.sources.common import Listing, list_root, to_records

log = logging.getLogger(__name__)

READERS: dict[str, ModuleType] = {
    "realiad": realiad,
    "mvtec": mvtec,
    "mpdd": mvtec,
    "visa": visa,
    "btad": btad,
    "mvtec3d": mvtec3d,
    "folder": folder,
}


@dataclass
class SourceScan:
    """Every input of one source: records to write, inputs already quarantined, files ignored (by rule).

    ``inputs`` counts every entry under the root that is not a folder, plus the quarantine
    entries that have no file of their own (a listed file that is missing, an empty class folder).
    """

    spec: SourceSpec
    classes: list[str]
    records: list[SampleRecord]
    quarantined: list[Quarantined]
    ignored: Counter
    inputs: int


def _find_classes(reader: ModuleType, listing: Listing) -> list[str]:
    """The class folders of the reader's layout under the listed root."""
    find = getattr(reader, "find_classes", None)
    return find(listing) if find is not None else listing.subdirs(reader.CLASS_DIR)


def _looks_like(listing: Listing, layout: str) -> list[str]:
    """Other layouts under which this root yields images (for the error message)."""
    out = []
    for name, mod in READERS.items():
        if name in (layout, "mpdd") or mod is READERS[layout]:
            continue
        try:
            if mod.scan(listing, _find_classes(mod, listing), True).candidates:
                out.append(name)
        except DataError:
            continue
    return out


def _hint(listing: Listing, layout: str) -> str:
    others = _looks_like(listing, layout)
    return f" It looks like the {' / '.join(others)} layout: set layout accordingly." if others else ""


def scan_source(spec: SourceSpec) -> SourceScan:
    """List the source's root and read it with its layout's reader; DataError when it does not fit."""
    reader = READERS[spec.layout]
    listing = list_root(spec.root)
    available = _find_classes(reader, listing)
    if spec.classes == "all":
        classes = available
    else:
        unknown = [c for c in spec.classes if c not in available]
        if unknown:
            raise DataError(
                f"source {spec.name!r}: classes {unknown} are not in {spec.root!r} "
                f"(found: {available or 'no class folders'}); fix sources[].classes"
            )
        classes = list(spec.classes)
    try:
        found = reader.scan(listing, classes, spec.masks != "none")
    except DataError as e:
        raise DataError(f"source {spec.name!r}: {e}.{_hint(listing, spec.layout)}") from None
    if not found.candidates:
        raise DataError(
            f"source {spec.name!r}: root {spec.root!r} does not match the {spec.layout!r} layout: expected "
            f"{reader.EXPECTED}; found {listing.top() or 'nothing'}.{_hint(listing, spec.layout)}"
        )
    acc = to_records(spec, listing, found, reader, classes, available)
    log.info(
        "source %s (%s, %d classes): %d inputs, %d quarantined at scan, %d ignored",
        spec.name, spec.layout, len(classes), acc.inputs, len(acc.quarantined), sum(acc.ignored.values()),
    )
    return SourceScan(spec, classes, acc.records, acc.quarantined, acc.ignored, acc.inputs)


__all__ = ["READERS", "SourceScan", "scan_source"]
