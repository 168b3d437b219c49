"""BTAD: ``<01|02|03>/train/ok/*``, ``<class>/test/{ok,ko}/*``, masks ``<class>/ground_truth/ko/<stem>.<png|bmp>``."""

from __future__ import annotations

from shards.record import image_ext
from shards.sources.common import Candidate, Found, Listing, scan_classes, stem

EXPECTED = "<class>/train/ok/*, <class>/test/ok/*, <class>/test/ko/*, <class>/ground_truth/ko/<stem>.png|.bmp"
CLASS_DIR = ""
MASKS = ("*/ground_truth/*",)
_MASK_EXT_ORDER = ("png", "bmp", "tiff", "jpg")


def _mask_for(listing: Listing, cls: str, image_name: str) -> str:
    """The ground-truth file with the image's stem (png preferred, then bmp); bmp/png mixes are normal here."""
    by_stem: dict[str, list[str]] = {}
    for name in listing.files_in(f"{cls}/ground_truth/ko"):
        if image_ext(name):
            by_stem.setdefault(stem(name), []).append(name)
    options = sorted(by_stem.get(stem(image_name), []), key=lambda n: _MASK_EXT_ORDER.index(image_ext(n)))
    return f"{cls}/ground_truth/ko/{options[0] if options else stem(image_name) + '.png'}"


def _scan_class(listing: Listing, cls: str, found: Found) -> None:
    for split, sub in (("train", "ok"), ("test", "ok")):
        for name in listing.files_in(f"{cls}/{split}/{sub}"):
            found.candidates.append(Candidate(cls, split, 0, "good", f"{cls}/{split}/{sub}/{name}"))
    for name in listing.files_in(f"{cls}/test/ko"):
        mask = _mask_for(listing, cls, name)
        found.candidates.append(Candidate(cls, "test", 1, "ko", f"{cls}/test/ko/{name}", mask=mask))


def scan(listing: Listing, classes: list[str], masks: bool) -> Found:
    return scan_classes(listing, classes, EXPECTED, _scan_class)
