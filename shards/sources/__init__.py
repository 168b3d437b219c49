"""Source readers, one per on-disk layout, and :func:`scan_source` that runs the right one.

Each layout module exposes ``EXPECTED`` (the layout in one line, for error messages),
``CLASS_DIR`` (the folder that holds the class folders), ``find_classes(listing)`` and
``scan(listing, classes, masks) -> Found``. See docs/layouts.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

from pipeline.config import SourceSpec
from pipeline.errors import DataError
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
    """Every input of one source: records to write and inputs already quarantined."""

    spec: SourceSpec
    classes: list[str]
    records: list[SampleRecord]
    quarantined: list[Quarantined]

    @property
    def inputs(self) -> int:
        return len(self.records) + len(self.quarantined)


def _looks_like(listing: Listing, layout: str) -> list[str]:
    """Other layouts under which this root yields images (for the error message)."""
    out = []
    for name, mod in READERS.items():
        if name in (layout, "mpdd") or mod is READERS[layout]:
            continue
        try:
            if mod.scan(listing, mod.find_classes(listing), True).candidates:
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
    available = reader.find_classes(listing)
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
    selected = set(classes)
    prefix = [p for p in reader.CLASS_DIR.split("/") if p]

    def class_of_path(rel: str) -> str | None:
        parts = rel.split("/")
        if parts[: len(prefix)] != prefix or len(parts) <= len(prefix):
            return None
        cls = parts[len(prefix)]
        return cls if cls in selected or (spec.classes == "all" and len(parts) == len(prefix) + 1) else None

    records, quarantined = to_records(spec, listing, found, class_of_path)
    log.info(
        "source %s (%s, %d classes): %d inputs, %d quarantined at scan",
        spec.name, spec.layout, len(classes), len(records) + len(quarantined), len(quarantined),
    )
    return SourceScan(spec, classes, records, quarantined)


__all__ = ["READERS", "SourceScan", "scan_source"]
