"""Synthetic data in each public layout: file names and formats, exact masks (with and without
camera effects), split and annotation files, non-square images through every layout's reader."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from shards.errors import UserError
from shards import synth
from shards.record import load_sample
from shards.sources import scan_source
from shards.spec import SourceSpec
from shards.synth.defects import DEFECT_TYPES, REALIAD_CODES
from shards.synth.samples import ClassSource
pytest.register_assert_rewrite("synth_checks")
from synth_checks import CAMERA_COVERED, assert_exact, check_mask, read  # noqa: E402

SMALL = dict(normal=5, abnormal=4, size=64)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["mvtec", "mpdd"])
def test_mvtec_layout(tmp_path: Path, layout: str) -> None:
    s = synth.generate(layout, tmp_path, classes=2, **SMALL)
    for cls in synth.CLASS_NAMES[:2]:
        root = tmp_path / cls
        train = sorted(root.glob("train/*/*"))
        assert {p.parent.name for p in train} == {"good"} and len(train) == 4
        assert [p.name for p in train] == ["000.png", "001.png", "002.png", "003.png"]
        assert [p.name for p in (root / "test/good").iterdir()] == ["000.png"]
        defects = sorted(p for p in root.glob("test/*/*.png") if p.parent.name != "good")
        assert len(defects) == 4
        for img in defects:
            assert img.parent.name in DEFECT_TYPES and re.fullmatch(r"\d{3}\.png", img.name)
            check_mask(root / "ground_truth" / img.parent.name / f"{img.stem}_mask.png", img)
        masks = sorted(root.glob("ground_truth/*/*"))
        assert len(masks) == 4 and all(m.name.endswith("_mask.png") for m in masks)
        assert not (root / "ground_truth/good").exists()
        assert {p.parts[len(root.parts)] for p in root.rglob("*.png")} == {"train", "test", "ground_truth"}
    assert s.images == 18 and s.masks == 8 and sum(s.defects.values()) == 8
    info = json.loads((tmp_path / synth.INFO_FILE).read_text())
    assert info["synthetic"] and info["layout"] == layout


@pytest.mark.parametrize("camera", [False, True])
def test_written_mask_is_exactly_the_change(tmp_path: Path, camera: bool) -> None:
    """The PNG on disk differs from the same instance without the defect exactly under its mask;
    with camera effects, within the blur's ring of the mask (and nearly every mask pixel changed)."""
    synth.generate("mvtec", tmp_path, classes=["synth_nut", "synth_tile"], normal=2, abnormal=6, size=64, camera=camera)
    for cls in ("synth_nut", "synth_tile"):
        src = ClassSource(cls, 0, 6, None, 2, camera=camera)
        seen: dict[str, int] = {}
        for j, spec in enumerate(src.plan):
            k = seen.get(spec.kind, 0)
            seen[spec.kind] = k + 1
            img = read(tmp_path / cls / "test" / spec.kind / f"{k:03d}.png", cv2.IMREAD_COLOR)[..., ::-1]
            mask = read(tmp_path / cls / "ground_truth" / spec.kind / f"{k:03d}_mask.png")
            item = src.single(j, 64, spec)
            assert (item.mask == mask).all()
            if camera:
                assert 1 <= item.ring <= 3
                assert_exact(item.clean, img, mask, ring=item.ring, covered=CAMERA_COVERED)
            else:
                assert item.ring == 1
                assert_exact(item.clean, img, mask)


def test_visa_layout(tmp_path: Path) -> None:
    synth.generate("visa", tmp_path, classes=2, **SMALL)
    with open(tmp_path / "split_csv/1cls.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["object", "split", "label", "image", "mask"]
    assert len(rows) == 2 * 9
    for r in rows:
        img = tmp_path / r["image"]
        assert img.is_file() and r["object"] in synth.CLASS_NAMES[:2]
        if r["label"] == "normal":
            assert re.fullmatch(r"[a-z_]+/Data/Images/Normal/\d{4}\.JPG", r["image"]) and r["mask"] == ""
            assert r["split"] in ("train", "test")
        else:
            assert r["label"] == "anomaly" and r["split"] == "test"
            assert re.fullmatch(r"[a-z_]+/Data/Images/Anomaly/\d{3}\.JPG", r["image"])
            assert r["mask"] == r["image"].replace("Images", "Masks").replace(".JPG", ".png")
            check_mask(tmp_path / r["mask"], img)
    assert sum(r["split"] == "test" and r["label"] == "normal" for r in rows) == 2
    assert read(tmp_path / rows[0]["image"], cv2.IMREAD_COLOR).shape == (64, 64, 3)
    assert not list(tmp_path.glob("*/Data/Masks/Normal"))
    with open(tmp_path / "synth_wood/image_anno.csv", newline="") as f:
        anno = list(csv.DictReader(f))
    assert list(anno[0]) == ["image", "label", "mask"] and len(anno) == 9


def test_btad_layout_formats(tmp_path: Path) -> None:
    s = synth.generate("btad", tmp_path, classes=3, **SMALL)
    for product, (img_sfx, mask_sfx) in {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}.items():
        root = tmp_path / product
        assert sorted(p.name for p in (root / "train/ok").iterdir()) == [f"{i:04d}{img_sfx}" for i in range(4)]
        assert sorted(p.name for p in (root / "test/ok").iterdir()) == [f"0000{img_sfx}"]
        ko = sorted((root / "test/ko").iterdir())
        assert [p.name for p in ko] == [f"{i:04d}{img_sfx}" for i in range(4)]
        for img in ko:
            check_mask(root / "ground_truth/ko" / f"{img.stem}{mask_sfx}", img)
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == ["ko"]
    assert json.loads((tmp_path / synth.INFO_FILE).read_text())["products"] == dict(zip(["01", "02", "03"], s.classes))
    with pytest.raises(UserError, match="three products"):
        synth.generate("btad", tmp_path / "x", classes=4, **SMALL)


def test_mvtec3d_layout(tmp_path: Path) -> None:
    synth.generate("mvtec3d", tmp_path, classes=1, normal=10, abnormal=3, size=48)
    root = tmp_path / "synth_wood"
    assert sorted(p.name for p in (root / "train/good/rgb").iterdir()) == [f"{i:03d}.png" for i in range(7)]
    assert sorted(p.name for p in (root / "validation/good/rgb").iterdir()) == ["000.png"]
    assert sorted(p.name for p in (root / "test/good/rgb").iterdir()) == ["000.png", "001.png"]
    for split in ("train/good", "validation/good"):
        assert sorted(p.name for p in (root / split).iterdir()) == ["rgb", "xyz"]
    for folder in root.glob("test/*"):
        assert sorted(p.name for p in folder.iterdir()) == ["gt", "rgb", "xyz"]
        for rgb in (folder / "rgb").iterdir():
            xyz = tifffile.imread(folder / "xyz" / f"{rgb.stem}.tiff")
            assert xyz.shape == (48, 48, 3) and xyz.dtype == np.float32
            if folder.name == "good":  # all-zero ground truth for good test images, as in MVTec 3D-AD
                gt = read(folder / "gt" / rgb.name)
                assert gt.shape == (48, 48) and not gt.any()
            else:
                assert folder.name in DEFECT_TYPES
                check_mask(folder / "gt" / rgb.name, rgb)
    assert sum(1 for _ in root.glob("test/*/rgb/*.png")) == 5


def test_realiad_layout_and_json(tmp_path: Path) -> None:
    s = synth.generate("realiad", tmp_path, classes=["synth_screw", "synth_fabric"], normal=3, abnormal=3, size=64, views=5)
    for cls in ("synth_screw", "synth_fabric"):
        doc = json.loads((tmp_path / "realiad_jsons/realiad_jsons" / f"{cls}.json").read_text())
        assert set(doc) == {"meta", "train", "test"}
        assert doc["meta"]["normal_class"] == "OK" and doc["meta"]["prefix"] == ""
        entries = doc["train"] + doc["test"]
        assert all(set(e) == {"category", "anomaly_class", "image_path", "mask_path"} for e in entries)
        assert all(e["anomaly_class"] == "OK" for e in doc["train"])
        root = tmp_path / "realiad_512" / cls
        on_disk = {str(p.relative_to(root)) for p in root.rglob("*.jpg")}
        assert on_disk == {e["image_path"] for e in entries} and len(on_disk) == 6 * 5
        pattern = re.compile(
            rf"(OK/S(?P<s>\d{{4}})/{cls}_(?P=s)_OK|NG/(?P<c>[A-Z]{{2}})/S(?P<t>\d{{4}})/{cls}_(?P=t)_NG_(?P=c))_C[1-5]_\d{{14}}\.jpg"
        )
        samples: dict[str, set[str]] = {}
        for e in entries:
            m = pattern.fullmatch(e["image_path"])
            assert m, e["image_path"]
            assert e["category"] == cls
            samples.setdefault(str(Path(e["image_path"]).parent), set()).add(e["image_path"].split("_")[-2])
            if e["mask_path"] is None:
                assert e["anomaly_class"] == "OK"
                assert not (root / e["image_path"]).with_suffix(".png").exists()
            else:
                assert e["image_path"].startswith("NG/") and e["anomaly_class"] == m.group("c")
                assert e["anomaly_class"] in REALIAD_CODES.values()
                assert e["mask_path"] == e["image_path"][:-4] + ".png"
                check_mask(root / e["mask_path"], root / e["image_path"])
        assert len(samples) == 6 and all(v == {"C1", "C2", "C3", "C4", "C5"} for v in samples.values())
        assert sum(e["mask_path"] is not None for e in entries) >= 3 * 4
    assert s.images == 2 * 6 * 5


@pytest.mark.parametrize("camera", [False, True])
def test_realiad_views_are_exact_and_differ(tmp_path: Path, camera: bool) -> None:
    src = ClassSource("synth_pill", 0, 4, None, 1, camera=camera)
    for j, spec in enumerate(src.plan):
        items = src.views(j, 64, 5, spec)
        assert len(items) == 5
        for item in items:
            if item.mask is not None:
                assert item.ring == 1 if not camera else 1 <= item.ring <= 3
                assert_exact(item.clean, item.image, item.mask, ring=item.ring, covered=0.95 if not camera else CAMERA_COVERED)
            else:
                assert (item.image == item.clean).all()
        assert all(np.abs(a.clean.astype(int) - b.clean.astype(int)).mean() > 2 for a, b in zip(items, items[1:]))


# --------------------------------------------------------------------------- non-square images


@pytest.mark.parametrize("layout", synth.SYNTH_LAYOUTS)
def test_non_square_images_through_every_layout_and_its_reader(tmp_path: Path, layout: str) -> None:
    """48 wide, 32 high: every file the layout writes has that size, the layout's reader finds
    every image, and every record loads with its mask of the image's size."""
    classes = ["synth_gear", "synth_label"] if layout != "btad" else ["synth_gear", "synth_label", "synth_weave"]
    s = synth.generate(layout, tmp_path, classes=classes, normal=3, abnormal=2, size=48, height=32, views=2)
    assert json.loads((tmp_path / synth.INFO_FILE).read_text())["height"] == 32
    for path in tmp_path.rglob("*"):
        if path.suffix.lower() in (".png", ".jpg", ".bmp"):
            assert read(path).shape[:2] == (32, 48), path
        elif path.suffix == ".tiff":
            assert tifffile.imread(path).shape == (32, 48, 3)
    scan = scan_source(SourceSpec(name="ns", layout=layout, root=str(tmp_path), split="pretrain"))
    assert scan.quarantined == [] and len(scan.records) == s.images
    for rec in scan.records:
        sample = load_sample(rec)
        assert (sample.meta["width"], sample.meta["height"]) == (48, 32)
        assert sample.meta["has_mask"] == bool(rec.label)
        masks = [data for name, data in sample.members if name.endswith(".mask.png")]
        if masks:
            mask = cv2.imdecode(np.frombuffer(masks[0], np.uint8), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (32, 48) and mask.any()
