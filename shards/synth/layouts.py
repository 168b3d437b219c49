"""The layout writers: each writes one public dataset's folder structure, file names and
formats (MVTec AD and MPDD, VisA, BTAD, MVTec 3D-AD, Real-IAD), as docs/synth.md describes."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import datetime, timedelta
from typing import Callable

import numpy as np

from shards.synth.defects import REALIAD_CODES
from shards.synth.output import Run, encode
from shards.synth.samples import Item, seed_of


SYNTH_LAYOUTS = ("realiad", "mvtec", "visa", "btad", "mpdd", "mvtec3d")
BTAD_FORMATS = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
"""BTAD's image and mask formats per product, as in the original archive."""
REALIAD_DIR = "realiad_512"


def _split(n: int, validation: bool = False) -> tuple[int, int, int]:
    """(train, validation, test) counts of n normal images: about 20 % test (10 % validation)."""
    test = max(1, round(0.2 * n)) if n >= 2 else 0
    val = max(1, round(0.1 * n)) if validation and n >= 3 else 0
    return n - test - val, val, test


def _width(n: int, minimum: int) -> int:
    """Zero-padding that gives every file of a folder of n files the same name length."""
    return max(minimum, len(str(max(n - 1, 0))))


def _write_mvtec(run: Run) -> None:
    """MVTec AD (and MPDD): <cls>/train/good, <cls>/test/<good|defect>, <cls>/ground_truth/<defect>/*_mask.png."""
    for src in run.sources():
        cls = src.name
        n_train, _, n_test = _split(run.normal)
        for i in range(run.normal):
            item = src.single(i, run.size, None)
            if i < n_train:
                run.image(cls, f"{cls}/train/good/{i:0{_width(n_train, 3)}d}.png", item, ".png")
            else:
                run.image(cls, f"{cls}/test/good/{i - n_train:0{_width(n_test, 3)}d}.png", item, ".png")
        per_type = Counter(s.kind for s in src.plan)
        seen: Counter = Counter()
        for j, spec in enumerate(src.plan):
            item = src.single(j, run.size, spec)
            stem = f"{seen[spec.kind]:0{_width(per_type[spec.kind], 3)}d}"
            seen[spec.kind] += 1
            run.image(cls, f"{cls}/test/{spec.kind}/{stem}.png", item, ".png")
            run.mask(f"{cls}/ground_truth/{spec.kind}/{stem}_mask.png", item.mask, ".png")


def _write_visa(run: Run) -> None:
    """VisA: <cls>/Data/Images/{Normal,Anomaly}/*.JPG, <cls>/Data/Masks/Anomaly/*.png, split_csv/1cls.csv."""
    rows = []
    for src in run.sources():
        cls = src.name
        anno = []
        n_train, _, _ = _split(run.normal)
        wn, wa = _width(run.normal, 4), _width(run.abnormal, 3)
        for i in range(run.normal):
            rel = f"{cls}/Data/Images/Normal/{i:0{wn}d}.JPG"
            run.image(cls, rel, src.single(i, run.size, None), ".jpg")
            rows.append([cls, "train" if i < n_train else "test", "normal", rel, ""])
            anno.append([rel, "normal", ""])
        for j, spec in enumerate(src.plan):
            rel = f"{cls}/Data/Images/Anomaly/{j:0{wa}d}.JPG"
            mrel = f"{cls}/Data/Masks/Anomaly/{j:0{wa}d}.png"
            item = src.single(j, run.size, spec)
            run.image(cls, rel, item, ".jpg")
            run.mask(mrel, item.mask, ".png")
            rows.append([cls, "test", "anomaly", rel, mrel])
            anno.append([rel, spec.kind, mrel])
        run.text(f"{cls}/image_anno.csv", _csv(["image", "label", "mask"], anno))
    run.text("split_csv/1cls.csv", _csv(["object", "split", "label", "image", "mask"], rows))


def _csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _write_btad(run: Run) -> None:
    """BTAD: products 01, 02, 03 with train/ok, test/{ok,ko}, ground_truth/ko, each in its own formats."""
    for product, src in zip(BTAD_FORMATS, run.sources()):
        img_sfx, mask_sfx = BTAD_FORMATS[product]
        n_train, _, n_test = _split(run.normal)
        for i in range(run.normal):
            item = src.single(i, run.size, None)
            if i < n_train:
                run.image(src.name, f"{product}/train/ok/{i:0{_width(n_train, 4)}d}{img_sfx}", item, img_sfx)
            else:
                run.image(src.name, f"{product}/test/ok/{i - n_train:0{_width(n_test, 4)}d}{img_sfx}", item, img_sfx)
        wa = _width(run.abnormal, 4)
        for j, spec in enumerate(src.plan):
            item = src.single(j, run.size, spec)
            run.image(src.name, f"{product}/test/ko/{j:0{wa}d}{img_sfx}", item, img_sfx)
            run.mask(f"{product}/ground_truth/ko/{j:0{wa}d}{mask_sfx}", item.mask, mask_sfx)


def _write_mvtec3d(run: Run) -> None:
    """MVTec 3D-AD: <cls>/{train,validation,test}/<good|defect>/{rgb,gt,xyz}/NNN.{png,tiff}.

    gt exists for every test image (all zero for test/good), as in the original; xyz is an
    all-zero (no valid point) organised point cloud of the image's size."""
    xyz = encode(np.zeros((run.height, run.size, 3), np.float32), ".tiff")
    empty = np.zeros((run.height, run.size), np.uint8)

    def put(cls: str, folder: str, stem: str, item: Item, gt: bool) -> None:
        run.image(cls, f"{cls}/{folder}/rgb/{stem}.png", item, ".png")
        run.sink.write(f"{cls}/{folder}/xyz/{stem}.tiff", xyz)
        if gt:
            run.mask(f"{cls}/{folder}/gt/{stem}.png", empty if item.mask is None else item.mask, ".png")

    for src in run.sources():
        cls = src.name
        n_train, n_val, n_test = _split(run.normal, validation=True)
        for i in range(run.normal):
            item = src.single(i, run.size, None)
            if i < n_train:
                put(cls, "train/good", f"{i:0{_width(n_train, 3)}d}", item, False)
            elif i < n_train + n_val:
                put(cls, "validation/good", f"{i - n_train:0{_width(n_val, 3)}d}", item, False)
            else:
                put(cls, "test/good", f"{i - n_train - n_val:0{_width(n_test, 3)}d}", item, True)
        per_type = Counter(s.kind for s in src.plan)
        seen: Counter = Counter()
        for j, spec in enumerate(src.plan):
            stem = f"{seen[spec.kind]:0{_width(per_type[spec.kind], 3)}d}"
            seen[spec.kind] += 1
            put(cls, f"test/{spec.kind}", stem, src.single(j, run.size, spec), True)


def _timestamp(cls: str, sample: int) -> str:
    t = datetime(2023, 9, 1, 8, 0, 0) + timedelta(seconds=seed_of(cls) % 86400 + 53 * sample)
    return t.strftime("%Y%m%d%H%M%S")


def _write_realiad(run: Run) -> None:
    """Real-IAD: realiad_512/<cls>/OK/<S>/..._OK_C<v>_<time>.jpg, NG/<code>/<S>/..._NG_<code>_C<v>_<time>.jpg
    with the mask as the same stem .png, and realiad_jsons/realiad_jsons/<cls>.json."""
    for src in run.sources():
        cls = src.name
        n_train, _, _ = _split(run.normal)
        split = {"train": [], "test": []}
        total = run.normal + run.abnormal
        ws = _width(total + 1, 4)
        for s in range(total):
            spec = None if s < run.normal else src.plan[s - run.normal]
            sid = f"{s + 1:0{ws}d}"
            index = s if spec is None else s - run.normal
            if spec is None:
                folder, tag = f"OK/S{sid}", "OK"
            else:
                code = REALIAD_CODES[spec.kind]
                folder, tag = f"NG/{code}/S{sid}", f"NG_{code}"
            ts = _timestamp(cls, s + 1)
            entries = split["train" if s < n_train else "test"]
            for v, item in enumerate(src.views(index, run.size, run.views, spec), start=1):
                stem = f"{folder}/{cls}_{sid}_{tag}_C{v}_{ts}"
                run.image(cls, f"{REALIAD_DIR}/{cls}/{stem}.jpg", item, ".jpg")
                mask_path = None
                if item.mask is not None:
                    mask_path = f"{stem}.png"
                    run.mask(f"{REALIAD_DIR}/{cls}/{mask_path}", item.mask, ".png")
                entries.append({
                    "category": cls,
                    "anomaly_class": REALIAD_CODES[item.defect] if item.defect else "OK",
                    "image_path": f"{stem}.jpg",
                    "mask_path": mask_path,
                })
        doc = {"meta": {"prefix": "", "normal_class": "OK", "pre_transform": False}, **split}
        run.text(f"realiad_jsons/realiad_jsons/{cls}.json", json.dumps(doc, indent=1) + "\n")


WRITERS: dict[str, Callable[[Run], None]] = {
    "mvtec": _write_mvtec,
    "mpdd": _write_mvtec,
    "visa": _write_visa,
    "btad": _write_btad,
    "mvtec3d": _write_mvtec3d,
    "realiad": _write_realiad,
}
