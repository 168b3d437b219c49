"""Families of the synthetic data (disjoint classes and defect types), a chosen subset of the
defect types, the new products and defect renderers, and tile mode of --base-images."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import get_args

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.cli import main
from shards import synth
from shards.errors import UserError
from shards.sources import scan_source
from shards.spec import SourceSpec, SynthSpec
from shards.synth.defects import AREA_RANGE, CLASSIC_TYPES, DEFECT_TYPES, INSPECTION_TYPES, REALIAD_CODES, DefectSpec, apply_defect
from shards.synth.draw import to_uint8
from shards.synth.families import FAMILIES, FAMILY_NAMES, FAMILY_OF_DEFECT, area_span, defect_types
from shards.synth.products import CLASSES, GREY_CLASSES, render_class
from shards.synth.base import list_base_images, tiles
from shards.synth.samples import ClassSource
pytest.register_assert_rewrite("synth_checks")
from synth_checks import CAMERA_COVERED, assert_exact, check_mask, read  # noqa: E402


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the split


def test_families_are_disjoint_and_cover_every_class_and_defect_type() -> None:
    classes = [c for f in FAMILIES.values() for c in f.classes]
    defects = [d for f in FAMILIES.values() for d in f.defects]
    assert len(FAMILIES) >= 3
    assert sorted(classes) == sorted(synth.CLASS_NAMES) and len(set(classes)) == len(classes)
    assert sorted(defects) == sorted(DEFECT_TYPES) and len(set(defects)) == len(defects)
    assert FAMILY_NAMES == get_args(get_args(SynthSpec.model_fields["family"].annotation)[0])
    pre = FAMILIES["pretrain"]
    assert pre.defects == CLASSIC_TYPES and set(synth.CLASS_NAMES[:14]) <= set(pre.classes)
    assert len(pre.classes) == max(len(f.classes) for f in FAMILIES.values())
    for f in FAMILIES.values():  # every family: periodic and stochastic, grey and colour
        kinds = {(CLASSES[c].periodic, CLASSES[c].grey) for c in f.classes}
        assert {p for p, _ in kinds} == {True, False} and {g for _, g in kinds} == {True, False}, f.name
    assert len(set(REALIAD_CODES.values())) == len(DEFECT_TYPES)


def test_every_class_plans_only_its_familys_defects_over_the_whole_area_range() -> None:
    for name in synth.CLASS_NAMES:
        types = defect_types(name, None)
        fam = FAMILIES[FAMILY_OF_DEFECT[types[0]]]
        assert set(types) <= set(fam.defects) and name in fam.classes
        lo, hi = area_span(types)
        assert lo <= 0.0002 and hi >= 0.12
        edges = sorted(AREA_RANGE[t] for t in types)  # the ranges leave no gap
        assert all(b[0] <= max(a[1] for a in edges[: i + 1]) for i, b in enumerate(edges[1:]))
        plan = ClassSource(name, 0, 24, None, 1).plan
        assert {p.kind for p in plan} <= set(types) and len({p.kind for p in plan}) == len(types)
        assert min(p.area for p in plan) <= 0.001 and max(p.area for p in plan) >= 0.05


def _written_defects(root: Path, layout: str) -> set[str]:
    if layout == "mvtec":
        return {p.parent.name for p in root.glob("*/test/*/*.png") if p.parent.name != "good"}
    if layout == "visa":
        return {r["label"] for f in root.glob("*/image_anno.csv") for r in csv.DictReader(open(f)) if r["label"] != "normal"}
    codes = {v: k for k, v in REALIAD_CODES.items()}
    entries = [e for f in root.glob("realiad_jsons/realiad_jsons/*.json") for s in json.loads(f.read_text()).values()
               if isinstance(s, list) for e in s]
    folders = {p.name for p in root.glob("realiad_512/*/NG/*")}
    assert {e["anomaly_class"] for e in entries} - {"OK"} <= folders
    return {codes[c] for c in folders}


@pytest.mark.parametrize("family, layout", [("val", "mvtec"), ("eval", "realiad"), ("pretrain", "visa")])
def test_a_familys_abnormal_images_carry_only_its_defect_types(tmp_path: Path, family: str, layout: str) -> None:
    classes = None if family != "pretrain" else 3
    s = synth.generate(layout, tmp_path, family=family, classes=classes, normal=1, abnormal=6, size=40, views=2)
    assert list(s.classes) == list(FAMILIES[family].classes[: classes or 99])
    found = _written_defects(tmp_path, layout)
    assert found and found <= set(FAMILIES[family].defects), found
    info = json.loads((tmp_path / synth.INFO_FILE).read_text())
    assert info["family"] == family and set(info["families"].values()) == {family}
    assert set(info["defect_types"]) <= set(FAMILIES[family].defects)
    assert set(s.defects) <= set(FAMILIES[family].defects)


def test_family_chooses_the_classes(tmp_path: Path) -> None:
    s = synth.generate("mvtec", tmp_path / "a", family="val", classes=2, normal=1, abnormal=0, size=32)
    assert list(s.classes) == list(FAMILIES["val"].classes[:2])
    s = synth.generate("mvtec", tmp_path / "b", normal=1, abnormal=0, size=32)  # no family: the first four, as before
    assert list(s.classes) == list(synth.CLASS_NAMES[:4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(family="test"), "unknown family 'test'; valid families: pretrain, val, eval"),
        (dict(family="val", classes=["synth_weave", "synth_wood"]), "'synth_wood' belongs to family 'pretrain', not 'val'"),
        (dict(family="eval", classes=5), "between 1 and 4 for family 'eval'"),
        (dict(family="val", layout="btad"), "three products .*family 'val'"),
        (dict(base_mode="tile"), "give --base-images too"),
        (dict(base_mode="strips"), "--base-mode must be one of whole, tile"),
        (dict(height=16), "--height must be"),
    ],
)
def test_user_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = dict(layout="mvtec", out=tmp_path / "o", normal=2, abnormal=1, size=32) | kwargs
    with pytest.raises(UserError, match=message):
        synth.generate(args.pop("layout"), args.pop("out"), **args)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValidationError, match="family"):
        SynthSpec(family="test")


def test_chosen_defects_are_the_only_types_painted(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = SourceSpec(name="s", layout="mvtec", root=str(root), split="pretrain", synth=SynthSpec(
        family="pretrain", classes=["synth_wood", "synth_screw"], normal=1, abnormal=6, size=64, defects=["pit", "scratch"]))
    synth.generate_source(spec)
    abnormal = [r for r in scan_source(spec).records if r.label]
    assert len(abnormal) == 12 and {r.defect for r in abnormal} == {"scratch", "pit"}
    assert all(read(root / r.mask_path, cv2.IMREAD_GRAYSCALE).any() for r in abnormal)
    info = json.loads((root / synth.INFO_FILE).read_text())
    assert info["defects"] == ["pit", "scratch"] and info["defect_types"] == ["scratch", "pit"]
    # no abnormal images: a class need not take any of the types
    s = synth.generate("mvtec", tmp_path / "normal", family="val", classes=["synth_paper"], defects=["shifted_cell"],
                       normal=1, abnormal=0, size=32)
    assert s.classes == {"synth_paper": {"normal": 1, "abnormal": 0}}


_VAL = "choose among the defect types of family 'val': hairline, shifted_cell, stain, chip"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(defects=["stain", "stian"]), f"unknown defect type 'stian'; {_VAL}"),
        (dict(defects=["chip", "stain", "chip"]), rf"defect type 'chip' is given twice; name each type once \({_VAL}\)"),
        (dict(defects=[]), f"the list of defect types is empty; {_VAL}"),
        (dict(defects=["stain", "scratch"]), f"'scratch' belongs to family 'pretrain', not 'val'; {_VAL}"),
        (dict(classes=["synth_weave", "synth_paper"], defects=["shifted_cell"]),
         r"class 'synth_paper' takes none of the defect types shifted_cell \(shifted_cell: periodic classes only\); "
         "add one of hairline, stain, chip"),
        (dict(family=None, classes=["synth_wood", "synth_weave"], defects=["scratch"]),
         "class 'synth_weave' takes none of the defect types scratch; add one of hairline, shifted_cell, stain, chip"),
    ],
)
def test_chosen_defects_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = dict(family="val", normal=1, abnormal=1, size=32) | kwargs
    with pytest.raises(UserError, match=message):
        synth.generate("mvtec", tmp_path / "o", **args)
    root = tmp_path / "root"
    spec = SourceSpec(name="s", layout="mvtec", root=str(root), split="val", synth=SynthSpec(**args))
    with pytest.raises(UserError, match=message):
        synth.generate_source(spec)
    assert not (tmp_path / "o").exists() and not root.exists()


def test_cli_defect_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["synth", "--layout", "visa", "--family", "eval", "--classes", "1", "--normal", "1", "--abnormal", "2",
            "--size", "32", "--defect", "dirt"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "defects per type: dirt 2" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "b"), "--defect", "pit"]) == 2
    assert "'pit' belongs to family 'pretrain', not 'eval'" in capsys.readouterr().err


# --------------------------------------------------------------------------- new products and defects


@pytest.mark.parametrize("kind", INSPECTION_TYPES)
def test_new_defects_are_exact_with_their_contrast_and_area(kind: str) -> None:
    """On every class of its family that takes it: the mask is exactly the change (the docs'
    rule), the area follows the request, and the contrast spans barely visible to obvious."""
    size, (lo, hi) = 96, AREA_RANGE[kind]
    fam = FAMILIES[FAMILY_OF_DEFECT[kind]]
    for ci, name in enumerate(c for c in fam.classes if kind in defect_types(c, None)):
        for k, area in enumerate((lo, (lo * hi) ** 0.5, hi)):
            for c in (0.2, 1.0):
                rng = np.random.default_rng([ci, k, int(c * 10)])
                scene = render_class(name, rng, size)
                img, cov = apply_defect(scene, DefectSpec(kind, area, c), rng, size, 0.9)
                mask = cov >= 0.25
                clean, out = to_uint8(scene.image), to_uint8(img)
                assert_exact(clean, out, mask)
                assert 0.5 <= mask.mean() / max(area, 6 / size**2) <= 2.5, (name, area, mask.mean())
                peak = np.percentile(np.abs(out.astype(int) - clean.astype(int)).max(-1)[mask], 90)
                assert (7 <= peak <= 20) if c < 0.5 else peak >= 24, (name, area, c, peak)


def test_grey_classes_stay_grey_in_png_and_jpeg(tmp_path: Path) -> None:
    grey = ["synth_label", "synth_paper"]
    assert set(grey) <= set(GREY_CLASSES) and "synth_wafer" not in GREY_CLASSES
    for layout, pattern in (("mvtec", "synth_*/test/*/*.png"), ("visa", "synth_*/Data/Images/*/*.JPG")):
        synth.generate(layout, tmp_path / layout, classes=grey + ["synth_wafer"], normal=1, abnormal=3, size=40)
        for path in sorted(tmp_path.joinpath(layout).glob(pattern)):
            img = read(path, cv2.IMREAD_COLOR).astype(int)
            equal = (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
            assert equal == any(g in str(path) for g in grey), path


def test_new_classes_written_masks_are_the_change_through_the_camera(tmp_path: Path) -> None:
    names = ["synth_halftone", "synth_weave", "synth_painted", "synth_wafer", "synth_cast"]
    synth.generate("mvtec", tmp_path, classes=names, normal=1, abnormal=6, size=64)
    shares = []
    for cls in names:
        src = ClassSource(cls, 0, 6, None, 1)
        seen: dict[str, int] = {}
        for j, spec in enumerate(src.plan):
            k = seen.get(spec.kind, 0)
            seen[spec.kind] = k + 1
            img = read(tmp_path / cls / "test" / spec.kind / f"{k:03d}.png", cv2.IMREAD_COLOR)[..., ::-1]
            mask = check_mask(tmp_path / cls / "ground_truth" / spec.kind / f"{k:03d}_mask.png",
                              tmp_path / cls / "test" / spec.kind / f"{k:03d}.png")
            item = src.single(j, 64, spec)
            assert_exact(item.clean, img, mask, ring=item.ring, covered=CAMERA_COVERED)
            m = mask > 0
            shares.append(((item.clean != img).any(-1) & m).sum() / m.sum())
    assert np.mean(shares) >= 0.98


def test_same_arguments_give_identical_bytes_for_the_new_classes(tmp_path: Path) -> None:
    args = dict(classes=["synth_label", "synth_nonwoven"], normal=2, abnormal=2, size=40, height=32, views=2, seed=3)
    for layout in ("visa", "realiad"):
        synth.generate(layout, tmp_path / f"{layout}_a", **args)
        synth.generate(layout, tmp_path / f"{layout}_b", **args)
        assert files(tmp_path / f"{layout}_a") == files(tmp_path / f"{layout}_b")
    synth.generate("visa", tmp_path / "flat", **args, camera=False)
    a, b = files(tmp_path / "visa_a"), files(tmp_path / "flat")
    assert a.keys() == b.keys() and a["synth_label/Data/Images/Normal/0000.JPG"] != b["synth_label/Data/Images/Normal/0000.JPG"]


# --------------------------------------------------------------------------- tile mode


def _base_folder(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    base = tmp_path / "photos"
    base.mkdir()
    rng = np.random.default_rng(1)
    imgs = [cv2.GaussianBlur((rng.random((70, 100, 3)) * 255).astype(np.uint8), (0, 0), 2),
            cv2.GaussianBlur((rng.random((64, 64, 3)) * 255).astype(np.uint8), (0, 0), 2)]
    for i, img in enumerate(imgs):
        cv2.imwrite(str(base / f"p{i}.png"), img)
    return base, [img[..., ::-1] for img in imgs]


def test_tile_mode_cuts_every_image_and_paints_exact_defects(tmp_path: Path) -> None:
    base, imgs = _base_folder(tmp_path)
    s = synth.generate("mvtec", tmp_path / "out", base_images=base, base_mode="tile", tile=32, size=32,
                       normal=6, abnormal=5, family="eval")
    info = json.loads((tmp_path / "out" / synth.INFO_FILE).read_text())
    assert info["tiles"] == 3 * 2 + 2 * 2 and info["base_mode"] == "tile" and not info["camera"]
    assert s.classes == {"synth_photos": {"normal": 6, "abnormal": 5}}
    boxes = [(imgs[0], 2 + 32 * i, 3 + 32 * j) for j in range(2) for i in range(3)]
    boxes += [(imgs[1], 32 * i, 32 * j) for j in range(2) for i in range(2)]
    crops = [img[y : y + 32, x : x + 32] for img, x, y in boxes]
    root = tmp_path / "out/synth_photos"
    written = [read(p, cv2.IMREAD_COLOR)[..., ::-1] for p in sorted(root.glob("train/good/*.png"))]
    written += [read(p, cv2.IMREAD_COLOR)[..., ::-1] for p in sorted(root.glob("test/good/*.png"))]
    assert len(written) == 6 and all((a == b).all() for a, b in zip(written, crops))
    src = ClassSource("synth_photos", 0, 5, tiles(list_base_images(base), 32, 32), 6, family="eval")
    seen: dict[str, int] = {}
    for j, spec in enumerate(src.plan):
        assert spec.kind in FAMILIES["eval"].defects
        k = seen.get(spec.kind, 0)
        seen[spec.kind] = k + 1
        path = root / "test" / spec.kind / f"{k:03d}.png"
        mask = check_mask(root / "ground_truth" / spec.kind / f"{k:03d}_mask.png", path)
        item = src.single(j, 32, spec)
        assert (item.clean == crops[6 + j % 4]).all() and item.ring == 1
        assert_exact(item.clean, read(path, cv2.IMREAD_COLOR)[..., ::-1], mask)


def test_tile_mode_sizes_and_errors(tmp_path: Path) -> None:
    base, _ = _base_folder(tmp_path)
    s = synth.generate("mvtec", tmp_path / "ns", base_images=base, base_mode="tile", size=40, height=32, tile=40,
                       normal=20, abnormal=1)
    assert s.classes["synth_photos"]["normal"] == 2 * 2 + 1 * 2  # 40x32 tiles: 2x2 of 100x70, 1x2 of 64x64
    assert read(tmp_path / "ns/synth_photos/train/good/000.png").shape[:2] == (32, 40)
    s = synth.generate("mvtec", tmp_path / "scaled", base_images=base, base_mode="tile", size=32, tile=64,
                       normal=3, abnormal=0)
    assert read(tmp_path / "scaled/synth_photos/train/good/000.png").shape[:2] == (32, 32)
    with pytest.raises(UserError, match=r"p1.png' is 64x64 px, smaller than a 65x65 tile; give --tile 64 or less"):
        synth.generate("mvtec", tmp_path / "big", base_images=base, base_mode="tile", tile=65, size=32)
    with pytest.raises(UserError, match="--tile applies to --base-mode tile only"):
        synth.generate("mvtec", tmp_path / "whole", base_images=base, tile=32, size=32)
    assert not (tmp_path / "big").exists() and not (tmp_path / "whole").exists()


def test_cli_family_height_and_tiles(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert main(["synth", "--layout", "mvtec", "--out", str(out), "--family", "val", "--classes", "2", "--normal", "1",
                 "--abnormal", "1", "--size", "48", "--height", "40"]) == 0
    info = json.loads((out / synth.INFO_FILE).read_text())
    assert (info["family"], info["size"], info["height"], info["classes"]) == ("val", 48, 40, list(FAMILIES["val"].classes[:2]))
    base, _ = _base_folder(tmp_path)
    assert main(["synth", "--layout", "visa", "--out", str(tmp_path / "t"), "--base-images", str(base),
                 "--base-mode", "tile", "--tile", "32", "--size", "32", "--normal", "4", "--abnormal", "2"]) == 0
    assert "1 classes, 6 images, 2 masks" in capsys.readouterr().out
    assert main(["synth", "--layout", "mvtec", "--out", str(tmp_path / "x"), "--family", "val", "--class", "synth_wood"]) == 2
    assert "belongs to family 'pretrain'" in capsys.readouterr().err
