"""VisA: ``<class>/Data/Images/{Normal,Anomaly}/*.JPG``, ``<class>/Data/Masks/Anomaly/*.png`` and the
split file ``split_csv/1cls.csv`` (columns object, split, label, image, mask), which is required:
it is the only place the train/test split is given."""

from __future__ import annotations

import csv
import io

from shards.errors import DataError
from shards import storage
from shards.sources.common import Candidate, Found, Listing, empty_class

EXPECTED = "<class>/Data/Images/{Normal,Anomaly}/*.JPG, <class>/Data/Masks/Anomaly/*.png, split_csv/1cls.csv"
CLASS_DIR = ""
MASKS = ("*/Data/Masks/*",)
SPLIT_CSV = "split_csv/1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
NOT_READ = (("split_csv/*", "split files (split_csv/, 1cls.csv read for splits and labels)"),
            ("*/image_anno.csv", "annotation files (<class>/image_anno.csv, not read)"))


def find_classes(listing: Listing) -> list[str]:
    return [d for d in listing.subdirs(CLASS_DIR) if d != "split_csv"]


def _rows(listing: Listing) -> list[dict[str, str]]:
    if SPLIT_CSV not in listing.files:
        raise DataError(
            f"root {listing.root!r} does not match the 'visa' layout: {SPLIT_CSV} is missing (expected "
            f"{EXPECTED}); the split file ships with VisA, copy it next to the class folders"
        )
    text = storage.read_text(listing.url(SPLIT_CSV))
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{listing.url(SPLIT_CSV)!r} lacks the columns {missing} (expected {', '.join(_COLUMNS)})")
    return list(reader)


def scan(listing: Listing, classes: list[str], masks: bool) -> Found:
    found = Found()
    wanted = set(classes)
    listed: set[str] = set()
    for i, row in enumerate(_rows(listing), start=2):
        cls = row["object"].strip()
        if cls not in wanted:
            continue
        path = row["image"].strip().lstrip("/")
        if path in listed:
            found.reject(path, cls, f"{SPLIT_CSV} line {i}: image listed twice")
            continue
        listed.add(path)
        label = {"normal": 0, "anomaly": 1}.get(row["label"].strip().lower())
        split = row["split"].strip().lower()
        if label is None or split not in ("train", "test"):
            found.reject(path, cls, f"{SPLIT_CSV} line {i}: label {row['label']!r} / split {row['split']!r} "
                         "not in normal|anomaly / train|test")
            continue
        mask = (row["mask"].strip().lstrip("/") or None) if label else None
        defect = "anomaly" if label else "good"
        found.candidates.append(Candidate(cls, split, label, defect, path, mask=mask))
    for cls in classes:
        on_disk = [f"{cls}/Data/Images/{sub}/{n}" for sub in ("Normal", "Anomaly")
                   for n in listing.files_in(f"{cls}/Data/Images/{sub}")]
        for path in on_disk:
            if path not in listed:
                found.reject(path, cls, f"image not listed in {SPLIT_CSV} (its split is unknown)")
        if not on_disk and not any(c.cls == cls for c in found.candidates):
            empty_class(found, cls, cls, EXPECTED)
    return found
