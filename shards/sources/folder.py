"""The generic layout for a user's own data (see docs/layouts.md):
``<class>/good/*`` normal, ``<class>/<defect>/*`` abnormal, masks ``<class>/masks/<defect>/<stem>.png``.

There is no train/test split in this layout: normal images get split "train", abnormal
images split "test" (use the mvtec layout when a held-out normal test set is needed).
"""

from __future__ import annotations

from shards.sources.common import Candidate, Found, Listing, scan_classes, stem

EXPECTED = "<class>/good/*, <class>/<defect>/*, masks in <class>/masks/<defect>/<stem>.png"
CLASS_DIR = ""
MASKS = ("*/masks/*",)


def _scan_class(listing: Listing, cls: str, found: Found) -> None:
    for name in listing.files_in(cls):
        found.reject(f"{cls}/{name}", cls, "file directly in the class folder: put it in good/ or <defect>/")
    for sub in listing.subdirs(cls):
        if sub == "masks":
            continue
        for name in listing.files_in(f"{cls}/{sub}"):
            path = f"{cls}/{sub}/{name}"
            if sub == "good":
                found.candidates.append(Candidate(cls, "train", 0, "good", path))
            else:
                mask = f"{cls}/masks/{sub}/{stem(name)}.png"
                found.candidates.append(Candidate(cls, "test", 1, sub, path, mask=mask))


def scan(listing: Listing, classes: list[str], masks: bool) -> Found:
    return scan_classes(listing, classes, EXPECTED, _scan_class)
