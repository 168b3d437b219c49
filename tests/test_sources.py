"""Source readers on data written by ``shards.synth`` in each real layout: every image found,
splits and labels honoured, errors before any work, scan-time quarantine, sample keys."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.spec import SourceSpec
from shards.errors import DataError
from shards.record import make_key
from shards.sources import scan_source
from shards.synth import generate

SYNTH = dict(classes=2, normal=5, abnormal=3, size=32, views=5, seed=3)


def synth(tmp_path: Path, layout: str, **kw) -> tuple[Path, object]:
    root = tmp_path / layout
    summary = generate(layout, root, **{**SYNTH, **kw})
    return root, summary


def spec(layout: str, root, **kw) -> SourceSpec:
    return SourceSpec(**{"name": "src", "layout": layout, "root": str(root), "split": "pretrain", **kw})


def reasons(scan) -> list[str]:
    return sorted(q.reason for q in scan.quarantined)


# ----------------------------------------------------------------------------- every layout


@pytest.mark.parametrize("layout", ["mvtec", "mpdd", "visa", "btad", "mvtec3d", "realiad"])
def test_reader_finds_every_image_synth_wrote(tmp_path, layout):
    root, summary = synth(tmp_path, layout)
    scan = scan_source(spec(layout, root))
    assert scan.quarantined == []
    recs = scan.records
    # Per class, as many normal and abnormal images as were written.
    got = Counter((r.cls, r.label) for r in recs)
    products = json.loads((root / "synth_info.json").read_text()).get("products", {})  # btad: folder -> class
    folder_of = {cls: folder for folder, cls in products.items()}
    for cls, c in summary.classes.items():
        name = folder_of.get(cls, cls)
        assert got[(name, 0)] == c["normal"] and got[(name, 1)] == c["abnormal"], (cls, got)
    assert len(recs) == summary.images
    # Keys: unique, no dots or slashes, derived from the record's fields.
    keys = [r.key for r in recs]
    assert len(set(keys)) == len(keys)
    assert not any("." in k or "/" in k for k in keys)
    for r in recs:
        assert (root / r.path).is_file()
        assert r.url == f"{root}/{r.path}" and r.size == (root / r.path).stat().st_size
        assert r.role == "pretrain" and r.stream == ("abnormal" if r.label else "normal")
        assert (r.defect == "good") == (r.label == 0)
        assert r.has_mask == bool(r.label)
        if r.label:
            mask = np.asarray(Image.open(root / r.mask_path))
            assert mask.shape[:2] == (SYNTH["size"], SYNTH["size"]) and mask.any()
    splits = Counter(r.split for r in recs)
    if layout == "mvtec3d":
        assert set(splits) == {"train", "validation", "test"}
    else:
        assert set(splits) == {"train", "test"}
    if layout == "realiad":
        assert Counter(r.view for r in recs) == {f"C{v}": summary.images // 5 for v in range(1, 6)}
    else:
        assert {r.view for r in recs} == {None}


def test_mvtec_masks_pair_with_their_image_by_name(tmp_path):
    root, _ = synth(tmp_path, "mvtec")
    scan = scan_source(spec("mvtec", root))
    for r in scan.records:
        if r.label:
            cls, _, defect, name = r.path.split("/")
            assert r.mask_path == f"{cls}/ground_truth/{defect}/{name[:-4]}_mask.png"
            assert r.defect == defect and r.split == "test"


def test_visa_honours_the_split_csv(tmp_path):
    root, _ = synth(tmp_path, "visa")
    rows = list(csv.DictReader(open(root / "split_csv/1cls.csv")))
    rows[0]["split"] = "test"  # move one normal image from train to test
    with open(root / "split_csv/1cls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:-1])  # and drop the last row: its image is then not listed
    scan = scan_source(spec("visa", root))
    by_path = {r.path: r for r in scan.records}
    for row in rows[:-1]:
        r = by_path[row["image"]]
        assert (r.split, r.label, r.cls) == (row["split"], int(row["label"] == "anomaly"), row["object"])
        assert r.mask_path == (row["mask"] or None)
    assert [(q.path, q.reason) for q in scan.quarantined][:1] == [
        (rows[-1]["image"], "image not listed in split_csv/1cls.csv (its split is unknown)")
    ]
    # Its mask is a file no listed image uses: quarantined too (every file is accounted for).
    assert [(q.path, q.reason.split(":")[0]) for q in scan.quarantined][1:] == [
        (rows[-1]["mask"], "not the mask of any image")
    ]


def test_visa_without_split_csv_is_an_error(tmp_path):
    root, _ = synth(tmp_path, "visa")
    (root / "split_csv/1cls.csv").unlink()
    with pytest.raises(DataError, match="split_csv/1cls.csv"):
        scan_source(spec("visa", root))


def test_realiad_json_splits_and_labels_are_honoured(tmp_path):
    root, _ = synth(tmp_path, "realiad")
    jpath = next((root / "realiad_jsons").rglob("*.json"))
    doc = json.loads(jpath.read_text())
    moved = doc["train"].pop(0)
    doc["test"].append(moved)
    jpath.write_text(json.dumps(doc))
    scan = scan_source(spec("realiad", root))
    cls = jpath.stem
    by_path = {r.path: r for r in scan.records}
    for split in ("train", "test"):
        for e in doc[split]:
            r = by_path[f"realiad_512/{cls}/{e['image_path']}"]
            assert r.split == split
            assert r.label == int(e["anomaly_class"] != "OK")
            assert r.defect == ("good" if e["anomaly_class"] == "OK" else e["anomaly_class"])
            assert r.mask_path == (f"realiad_512/{cls}/{e['mask_path']}" if e["mask_path"] else None)
    assert scan.quarantined == []


def test_realiad_without_jsons_labels_by_folder_and_mask(tmp_path):
    root, _ = synth(tmp_path, "realiad")
    with_json = {r.path: (r.label, r.defect, r.view, r.mask_path) for r in scan_source(spec("realiad", root)).records}
    shutil.rmtree(root / "realiad_jsons")
    scan = scan_source(spec("realiad", root))
    assert scan.quarantined == []
    # The same labels, defects, views and masks as the json files give.
    assert {r.path: (r.label, r.defect, r.view, r.mask_path) for r in scan.records} == with_json
    assert {r.split for r in scan.records if "/OK/" in r.path} == {"train"}
    assert {r.split for r in scan.records if "/NG/" in r.path} == {"test"}


def folder_from_mvtec(tmp_path: Path) -> Path:
    """The generic folder layout, filled with synth's mvtec images."""
    src, _ = synth(tmp_path, "mvtec")
    dst = tmp_path / "folder"
    for img in sorted(src.glob("*/t*/*/*.png")):
        cls, split, defect, name = img.relative_to(src).parts
        out = dst / cls / defect / (f"{split}_{name}" if defect == "good" else name)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, out)
        if defect != "good":
            mask = src / cls / "ground_truth" / defect / f"{name[:-4]}_mask.png"
            (dst / cls / "masks" / defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(mask, dst / cls / "masks" / defect / name)
    return dst


def test_folder_layout(tmp_path):
    root = folder_from_mvtec(tmp_path)
    mv = scan_source(spec("mvtec", tmp_path / "mvtec"))
    scan = scan_source(spec("folder", root))
    assert scan.quarantined == []
    assert Counter((r.cls, r.label, r.defect) for r in scan.records) == Counter(
        (r.cls, r.label, r.defect) for r in mv.records
    )
    for r in scan.records:
        assert r.split == ("train" if r.label == 0 else "test")
        if r.label:
            assert r.mask_path == f"{r.cls}/masks/{r.defect}/{Path(r.path).name}"
    # A file directly in a class folder has no label.
    cls = scan.classes[0]
    shutil.copy(root / cls / "good" / "train_000.png", root / cls / "stray.png")
    assert reasons(scan_source(spec("folder", root))) == [
        "file directly in the class folder: put it in good/ or <defect>/"
    ]


# ----------------------------------------------------------------------------- errors before any work


def test_root_that_matches_no_layout_names_what_was_expected(tmp_path):
    root, _ = synth(tmp_path, "visa")
    with pytest.raises(DataError) as e:
        scan_source(spec("mvtec", root))
    msg = str(e.value)
    assert "does not match the 'mvtec' layout" in msg and "<class>/train/good/*.png" in msg
    assert "looks like the visa layout" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="does not match the 'btad' layout: expected <class>/train/ok"):
        scan_source(spec("btad", empty))
    with pytest.raises(DataError, match="does not exist"):
        scan_source(spec("mvtec", tmp_path / "nowhere"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        scan_source(spec("mvtec", tmp_path / "afile"))


def test_classes_all_or_a_list(tmp_path):
    root, summary = synth(tmp_path, "mvtec")
    first = list(summary.classes)[0]
    scan = scan_source(spec("mvtec", root, classes=[first]))
    assert scan.classes == [first] and {r.cls for r in scan.records} == {first}
    with pytest.raises(DataError, match=r"classes \['nope'\] are not in .* \(found: \['synth_"):
        scan_source(spec("mvtec", root, classes=[first, "nope"]))


# ----------------------------------------------------------------------------- bad inputs at scan time


def test_scan_quarantines_bad_inputs_and_accounts_for_every_input(tmp_path):
    root, summary = synth(tmp_path, "mvtec")
    cls = list(summary.classes)[0]
    good = root / cls / "train" / "good"
    n_images = summary.images
    # 1. an abnormal image whose mask is missing
    mask = sorted((root / cls / "ground_truth").rglob("*_mask.png"))[0]
    mask.unlink()
    # 2. an empty class folder
    (root / "emptyclass").mkdir()
    # 3. a duplicate key: same class/split/defect/stem, another extension
    shutil.copy(good / "000.png", good / "000.jpg")
    # 4. a symlink to a file outside the root, and one to a folder outside the root
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(good / "001.png", outside / "x.png")
    (good / "escape.png").symlink_to(outside / "x.png")
    (root / "linkedclass").symlink_to(outside, target_is_directory=True)
    # 5. a file that is not an image
    (good / "notes.txt").write_text("not an image")
    # 6. hidden files are not inputs; a symlink to a file inside the root is followed
    (good / ".DS_Store").write_bytes(b"\0")
    (good / "inside.png").symlink_to(good / "002.png")

    scan = scan_source(spec("mvtec", root))
    by_reason = {q.path: q.reason for q in scan.quarantined}
    stem = mask.name[: -len("_mask.png")]
    abnormal = next(p for p in by_reason if p.endswith(f"/{stem}.png") and "/test/" in p)
    assert "abnormal image without its mask" in by_reason[abnormal] and "masks: none" in by_reason[abnormal]
    assert by_reason["emptyclass"].startswith("class folder has no images")
    assert by_reason[f"{cls}/train/good/000.png"].startswith("duplicate key src+")
    assert "symlink pointing outside the source root" in by_reason[f"{cls}/train/good/escape.png"]
    assert "symlink pointing outside the source root" in by_reason["linkedclass"]
    assert by_reason[f"{cls}/train/good/notes.txt"].startswith("not an image file")
    assert len(by_reason) == 6
    assert any(r.path == f"{cls}/train/good/inside.png" for r in scan.records)
    # inputs = records' images and masks + quarantined + ignored (.DS_Store, synth_info.json in the
    # root): the synth images and masks, plus what was added.
    masks = len({r.mask_path for r in scan.records if r.mask_path})
    assert scan.ignored == {"hidden files": 1, "non-image files in the root (readme, license)": 1}
    assert scan.inputs == len(scan.records) + masks + len(scan.quarantined) + 2 == n_images + 6 + masks + 2


def test_masks_none_source_has_no_masks_and_needs_none(tmp_path):
    root, summary = synth(tmp_path, "mvtec")
    shutil.rmtree(root / list(summary.classes)[0] / "ground_truth")
    scan = scan_source(spec("mvtec", root, masks="none"))
    assert scan.quarantined == []
    assert sum(r.label for r in scan.records) == sum(c["abnormal"] for c in summary.classes.values())
    assert not any(r.has_mask for r in scan.records)
    # The same data with masks expected: the abnormal images of that class are bad inputs.
    with_masks = scan_source(spec("mvtec", root))
    assert len(with_masks.quarantined) == summary.classes[list(summary.classes)[0]]["abnormal"]


# ----------------------------------------------------------------------------- keys


def test_keys_are_deterministic_unique_and_dot_free():
    parts = [
        ("s", "a+b", "test", "d", None, "x"),
        ("s", "a", "test", "d", "+b", "x"),
        ("s", "a", "test", "d", None, "x.y"),
        ("s", "a", "test", "d", None, "x%2Ey"),
        ("s", "a", "test", "d", None, "x y/z"),
        ("s", "a", "test", "d", "", "x"),
        ("s", "a", "test", "d", None, "x"),
        ("s", "a", "train", "d", None, "x"),
        ("s", "a", "test", "good", "C1", "x"),
    ]
    keys = [make_key(*p) for p in parts]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert keys == [make_key(*p) for p in parts]
    assert make_key("mvtec", "metal_nut", "test", "bent", None, "000") == "mvtec+metal_nut+test+bent++000"
