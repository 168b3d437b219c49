"""Real-IAD: ``realiad_512/<class>/OK/<sample>/<class>_<sample>_OK_C<v>_<time>.jpg`` and
``realiad_512/<class>/NG/<defect>/<sample>/..._NG_C<v>_....jpg`` with the mask beside it under
the same stem as ``.png``; five camera views C1..C5 per sample. The source root is the folder
that holds ``realiad_512/`` and, optionally, ``realiad_jsons/``.

Splits and labels: a class's json split file (``realiad_jsons/**/<class>.json``: meta +
train/test lists of {image_path, anomaly_class, mask_path, category}, paths relative to
``realiad_512/<class>/`` or to ``realiad_512/``) is honoured when present; images on disk that it does not list are
quarantined. Without one, OK samples get split "train" and NG samples split "test", and
an image of an NG sample without a mask beside it is a view that does not show the defect:
normal, as the json files list such views (with ``masks: none`` every NG image is abnormal).
"""

from __future__ import annotations

import json
import posixpath
import re

from shards.errors import DataError
from shards import storage
from shards.sources.common import Candidate, Found, Listing, empty_class

EXPECTED = (
    "realiad_512/<class>/OK/<sample>/*_C<v>_*.jpg, realiad_512/<class>/NG/<defect>/<sample>/*_C<v>_*.jpg "
    "with masks <stem>.png beside them, optional realiad_jsons/**/<class>.json"
)
DATA_DIR = "realiad_512"
JSON_DIR = "realiad_jsons"
CLASS_DIR = DATA_DIR
MASKS = (f"{DATA_DIR}/*/NG/*/*/*.png",)
NOT_READ = ((f"{JSON_DIR}*/*", "split files (realiad_jsons*/, read for splits and labels)"),)
_VIEW = re.compile(r"_C(\d+)_")
_IMAGE = re.compile(r"\.jpe?g$", re.IGNORECASE)


def _view(path: str) -> str | None:
    m = _VIEW.search(posixpath.basename(path))
    return f"C{int(m.group(1))}" if m else None


def _on_disk(listing: Listing, cls: str) -> list[tuple[str, str | None]]:
    """(image path, defect or None for OK) of every image of a class on disk."""
    base = f"{DATA_DIR}/{cls}"
    out: list[tuple[str, str | None]] = []
    for sample in listing.subdirs(f"{base}/OK"):
        out += [(f"{base}/OK/{sample}/{n}", None) for n in listing.files_in(f"{base}/OK/{sample}")]
    for defect in listing.subdirs(f"{base}/NG"):
        for sample in listing.subdirs(f"{base}/NG/{defect}"):
            folder = f"{base}/NG/{defect}/{sample}"
            out += [(f"{folder}/{n}", defect) for n in listing.files_in(folder) if _IMAGE.search(n)]
    return out


def _json_files(listing: Listing) -> dict[str, str]:
    """Class name -> its json split file (the shallowest one when several variants exist)."""
    found: dict[str, str] = {}
    for path in sorted((p for p in listing.files if p.startswith(JSON_DIR + "/") and p.endswith(".json")),
                       key=lambda p: (p.count("/"), p)):
        found.setdefault(posixpath.basename(path)[: -len(".json")], path)
    return found


def _add(found: Found, cls: str, split: str, path: str, defect: str | None, mask: str | None) -> None:
    view = _view(path)
    if view is None:
        found.reject(path, cls, "no camera view (_C<n>_) in the file name")
        return
    if defect is None:
        found.candidates.append(Candidate(cls, split, 0, "good", path, view=view))
    else:
        found.candidates.append(Candidate(cls, split, 1, defect, path, view=view, mask=mask))


def _from_json(listing: Listing, found: Found, cls: str, json_path: str) -> set[str]:
    url = listing.url(json_path)
    try:
        doc = json.loads(storage.read_text(url))
        meta = doc.get("meta", {})
        prefix = meta.get("prefix", "") or ""
        normal_class = meta.get("normal_class", "OK")
        entries = [(split, e) for split in ("train", "test") for e in doc.get(split, [])]
        listed: set[str] = set()
        def resolve(rel: str) -> str:
            # Paths are relative to the class folder; some copies make them relative to realiad_512/.
            options = [posixpath.normpath(posixpath.join(DATA_DIR, base, prefix, rel)) for base in (cls, "")]
            return next((p for p in options if p in listing.files), options[0])

        for split, e in entries:
            path = resolve(e["image_path"])
            if path in listed:
                found.reject(path, cls, f"{json_path}: image listed twice")
                continue
            listed.add(path)
            abnormal = e["anomaly_class"] != normal_class
            mask = None
            if abnormal:
                mask = resolve(e["mask_path"]) if e.get("mask_path") else f"{posixpath.splitext(path)[0]}.png"
            _add(found, cls, split, path, e["anomaly_class"] if abnormal else None, mask)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(
            f"Real-IAD split file {url!r} cannot be read: {type(err).__name__}: {err} (expected "
            "{meta, train: [{image_path, anomaly_class, mask_path}], test: [...]})"
        ) from None
    return listed


def scan(listing: Listing, classes: list[str], masks: bool) -> Found:
    found = Found()
    jsons = _json_files(listing)
    for cls in classes:
        n = len(found.candidates) + len(found.rejected)
        disk = _on_disk(listing, cls)
        if cls in jsons:
            listed = _from_json(listing, found, cls, jsons[cls])
            for path, _ in disk:
                if path not in listed:
                    found.reject(path, cls, f"image not listed in {jsons[cls]} (its split is unknown)")
        else:
            for path, defect in disk:
                mask = f"{posixpath.splitext(path)[0]}.png"
                split = "train" if defect is None else "test"
                if defect is not None and masks and mask not in listing.files:
                    defect = None  # a view of an NG sample that does not show the defect (listed as OK in the jsons)
                _add(found, cls, split, path, defect, mask)
        if len(found.candidates) + len(found.rejected) == n:
            empty_class(found, f"{DATA_DIR}/{cls}", cls, EXPECTED)
    return found
