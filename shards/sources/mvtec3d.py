"""MVTec 3D-AD, RGB only: ``<class>/{train,validation,test}/<good|defect>/rgb/NNN.png``,
masks ``.../<defect>/gt/NNN.png``; the xyz point clouds, the (empty) masks of good images and
the camera calibration are not read."""

from __future__ import annotations

from shards.sources.common import Candidate, Found, Listing, scan_classes, stem

EXPECTED = "<class>/{train,validation,test}/<good|defect>/rgb/*.png with masks in <defect>/gt/<stem>.png"
CLASS_DIR = ""
MASKS = ("*/gt/*",)
SPLITS = ("train", "validation", "test")
NOT_READ = (("*/xyz/*", "point clouds (xyz/, not read)"), ("*/calibration/*", "camera calibration (not read)"))


def _scan_class(listing: Listing, cls: str, found: Found) -> None:
    for split in SPLITS:
        for defect in listing.subdirs(f"{cls}/{split}"):
            folder = f"{cls}/{split}/{defect}"
            for name in listing.files_in(f"{folder}/rgb"):
                path, mask = f"{folder}/rgb/{name}", f"{folder}/gt/{stem(name)}.png"
                if defect == "good":
                    found.candidates.append(Candidate(cls, split, 0, "good", path, mask=mask))
                else:
                    found.candidates.append(Candidate(cls, split, 1, defect, path, mask=mask))


def scan(listing: Listing, classes: list[str], masks: bool) -> Found:
    return scan_classes(listing, classes, EXPECTED, _scan_class)
