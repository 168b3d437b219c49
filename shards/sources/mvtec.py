"""MVTec AD and MPDD: ``<class>/train/good/*``, ``<class>/test/<defect|good>/*``,
masks ``<class>/ground_truth/<defect>/<stem>_mask.png``."""

from __future__ import annotations

from shards.sources.common import Candidate, Found, Listing, scan_classes, stem

EXPECTED = "<class>/train/good/*.png, <class>/test/<defect|good>/*.png, <class>/ground_truth/<defect>/<stem>_mask.png"
CLASS_DIR = ""
MASKS = ("*/ground_truth/*",)


def _scan_class(listing: Listing, cls: str, found: Found) -> None:
    for name in listing.files_in(f"{cls}/train/good"):
        found.candidates.append(Candidate(cls, "train", 0, "good", f"{cls}/train/good/{name}"))
    for defect in listing.subdirs(f"{cls}/test"):
        for name in listing.files_in(f"{cls}/test/{defect}"):
            path = f"{cls}/test/{defect}/{name}"
            if defect == "good":
                found.candidates.append(Candidate(cls, "test", 0, "good", path))
            else:
                mask = f"{cls}/ground_truth/{defect}/{stem(name)}_mask.png"
                found.candidates.append(Candidate(cls, "test", 1, defect, path, mask=mask))


def scan(listing: Listing, classes: list[str], masks: bool) -> Found:
    return scan_classes(listing, classes, EXPECTED, _scan_class)
