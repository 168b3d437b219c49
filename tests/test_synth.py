"""Synthetic classes and defects with exact masks; determinism, size extremes, base images (whole
and in tiles), camera effects, user errors and the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.cli import main
from shards.errors import UserError
from shards import synth
from shards.spec import SourceSpec, SynthSpec
from shards.synth.camera import HEADROOM, draw_camera
from shards.synth.flaws import estimate_cells
from shards.synth.samples import ClassSource
from shards.synth.defects import (
    AREA_MAX,
    AREA_MIN,
    AREA_RANGE,
    DEFECT_TYPES,
    MASK_LEVEL,
    REALIAD_CODES,
    DefectSpec,
    apply_defect,
    plan_defects,
)
from shards.synth.draw import to_uint8
from shards.synth.shapes import blob as _blob
from shards.synth.objects import _hexagon_sdf
from shards.synth.products import CLASSES, render_class
from shards.synth.views import view_homography, warp_view
pytest.register_assert_rewrite("synth_checks")
from synth_checks import assert_exact, check_mask, read  # noqa: E402


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- classes and defects


def test_class_names_alternate_textures_and_objects() -> None:
    names = synth.CLASS_NAMES
    assert len(synth.TEXTURE_CLASSES) >= 6 and len(synth.OBJECT_CLASSES) >= 6
    assert all(n.startswith("synth_") for n in names) and len(set(names)) == len(names)
    kinds = [CLASSES[n].kind for n in names]
    assert kinds[:12] == ["texture", "object"] * 6
    assert len(DEFECT_TYPES) >= 6 and set(REALIAD_CODES) == set(DEFECT_TYPES)


@pytest.mark.parametrize("name", synth.CLASS_NAMES)
def test_every_defect_on_every_class_has_an_exact_mask(name: str) -> None:
    size = 80
    for j, kind in enumerate(DEFECT_TYPES):
        lo, hi = AREA_RANGE[kind]
        for area in (lo, (lo * hi) ** 0.5, hi):
            rng = np.random.default_rng([j, int(area * 1e6)])
            scene = render_class(name, rng, size)
            img, cov = apply_defect(scene, DefectSpec(kind, area, rng.uniform(0.2, 1.0)), rng, size, 0.9)
            mask = cov >= MASK_LEVEL
            clean, out = to_uint8(scene.image), to_uint8(img)
            assert out.shape == clean.shape == (size, size, 3) and out.dtype == np.uint8
            if not mask.any():  # a stroke that fell outside the product: nothing may have changed
                assert (out == clean).all(), (name, kind, area)
                continue
            assert_exact(clean, out, mask)


def test_hexagon_sdf_matches_a_brute_force_distance() -> None:
    """Signed distance to a hexagon (inradius 10, flat top and bottom) against float64
    point-to-segment distances, negative inside."""
    inradius = 10.0
    r = inradius / np.cos(np.pi / 6)
    corners = np.array([(r * np.cos(k * np.pi / 3), r * np.sin(k * np.pi / 3)) for k in range(6)])
    edges = list(zip(corners, np.roll(corners, -1, 0)))
    pts = np.random.default_rng(0).uniform(-20, 20, (400, 2))
    got = _hexagon_sdf(pts[:, 0].astype(np.float32), pts[:, 1].astype(np.float32), inradius)
    for p, d in zip(pts, got):
        dist = min(np.linalg.norm(p - (a + np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1) * (b - a)))
                   for a, b in edges)
        inside = all((b - a)[0] * (p - a)[1] - (b - a)[1] * (p - a)[0] >= 0 for a, b in edges)
        assert abs(float(d) - (-dist if inside else dist)) < 1e-3


def test_blob_covers_the_requested_number_of_pixels() -> None:
    for area in (6, 40, 333, 2500):
        rng = np.random.default_rng(area)
        cov, win, depth, _, _ = _blob(rng, 100.0, 100.0, area, 200, 200, 0.4, 1.5)
        assert np.count_nonzero(depth > 0) == area
        assert cov.shape == depth.shape == (win[0].stop - win[0].start, win[1].stop - win[1].start)
        assert ((cov >= 0.5) == (depth > 0)).mean() > 0.95


def test_view_warp_samples_the_canvas_through_the_homography() -> None:
    """warp_view against a float64 bilinear sampling of the canvas at H (x, y, 1)."""
    size, canvas = 24, 32
    img = np.random.default_rng(1).random((canvas, canvas)).astype(np.float32)
    for view in range(5):
        hom = view_homography(np.random.default_rng(view), view, size, canvas)
        got = warp_view(img, hom, size)
        for y in range(size):
            for x in range(size):
                u, v, w = hom @ np.array([x, y, 1.0])
                u, v = u / w, v / w
                x0, y0 = int(np.floor(u)), int(np.floor(v))
                if not (0 <= x0 < canvas - 1 and 0 <= y0 < canvas - 1):
                    continue
                fx, fy = u - x0, v - y0
                ref = ((1 - fx) * (1 - fy) * img[y0, x0] + fx * (1 - fy) * img[y0, x0 + 1]
                       + (1 - fx) * fy * img[y0 + 1, x0] + fx * fy * img[y0 + 1, x0 + 1])
                assert abs(float(got[y, x]) - ref) < 2e-2


def test_plan_reaches_tiny_and_large_subtle_and_obvious() -> None:
    plan = plan_defects(np.random.default_rng(0), 40)
    areas = [p.area for p in plan]
    assert min(areas) <= 0.001 and max(areas) >= 0.05
    assert all(AREA_MIN <= a <= AREA_MAX for a in areas)
    assert all(AREA_RANGE[p.kind][0] <= p.area <= AREA_RANGE[p.kind][1] for p in plan)
    assert len({p.kind for p in plan}) >= 6
    contrast = [p.contrast for p in plan]
    assert min(contrast) < 0.4 and max(contrast) > 0.6


def test_normal_images_of_a_class_vary() -> None:
    for name in synth.CLASS_NAMES:
        a = to_uint8(render_class(name, np.random.default_rng([0, 0]), 64).image).astype(int)
        b = to_uint8(render_class(name, np.random.default_rng([0, 1]), 64).image).astype(int)
        assert np.abs(a - b).mean() > 2.0, name


# --------------------------------------------------------------------------- determinism, sizes, base images


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    for layout in ("mvtec", "realiad", "mvtec3d"):
        args = dict(classes=["synth_gear", "synth_leather"], normal=3, abnormal=3, size=48, views=2, seed=7)
        synth.generate(layout, tmp_path / f"{layout}_a", **args)
        synth.generate(layout, tmp_path / f"{layout}_b", **args)
        a, b = files(tmp_path / f"{layout}_a"), files(tmp_path / f"{layout}_b")
        assert a == b and len(a) > 10
        assert not any(".part" in name for name in a)
    # another seed gives other images; a class's images do not depend on the other classes
    synth.generate("mvtec", tmp_path / "seed8", classes=["synth_gear"], normal=3, abnormal=3, size=48, seed=8)
    synth.generate("mvtec", tmp_path / "alone", classes=["synth_gear"], normal=3, abnormal=3, size=48, seed=7)
    gear = {k: v for k, v in files(tmp_path / "mvtec_a").items() if k.startswith("synth_gear/")}
    assert gear == {k: v for k, v in files(tmp_path / "alone").items() if k.startswith("synth_gear/")}
    assert gear["synth_gear/train/good/000.png"] != files(tmp_path / "seed8")["synth_gear/train/good/000.png"]


def test_default_run_reaches_the_size_extremes(tmp_path: Path) -> None:
    s = synth.generate("mvtec", tmp_path)
    masks = sorted(tmp_path.glob("*/ground_truth/*/*_mask.png"))
    assert len(masks) == 4 * 10 == s.masks
    areas = [np.count_nonzero(read(m)) / (256 * 256) for m in masks]
    assert min(areas) <= 0.001, sorted(areas)[:3]
    assert max(areas) >= 0.05, sorted(areas)[-3:]
    assert sorted(areas) == sorted(a for _, _, a in s.mask_areas)
    assert len(s.defects) >= 6


def test_base_images(tmp_path: Path) -> None:
    base = tmp_path / "My Parts"
    base.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        img = cv2.GaussianBlur((rng.random((60, 80, 3)) * 255).astype(np.uint8), (0, 0), 3)
        cv2.imwrite(str(base / f"part{i}.{'png' if i % 2 else 'jpg'}"), img)
    (base / "notes.txt").write_text("not an image")
    s = synth.generate("mvtec", tmp_path / "out", base_images=base, normal=3, abnormal=4, size=48)
    assert list(s.classes) == ["synth_my_parts"]
    root = tmp_path / "out/synth_my_parts"
    first = read(root / "train/good/000.png", cv2.IMREAD_COLOR)
    expected = cv2.resize(read(base / "part0.jpg", cv2.IMREAD_COLOR)[:, 10:70], (48, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1
    defects = [p for p in root.glob("test/*/*.png") if p.parent.name != "good"]
    assert len(defects) == 4
    for img in defects:
        check_mask(root / "ground_truth" / img.parent.name / f"{img.stem}_mask.png", img)
    s = synth.generate("visa", tmp_path / "named", base_images=base, classes=["bracket"], normal=10, abnormal=1, size=48)
    assert list(s.classes) == ["bracket"] and s.classes["bracket"]["normal"] == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layout="coco"), "unknown layout"),
        (dict(classes=["synth_wood", "wood"]), "unknown class 'wood'; valid classes: synth_wood"),
        (dict(classes=0), "between 1 and"),
        (dict(normal=0), "--normal must be"),
        (dict(size=16), "--size must be"),
        (dict(views=6), "--views must be"),
        (dict(base_images="/nonexistent/folder"), "is not a folder"),
    ],
)
def test_user_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = dict(layout="mvtec", out=tmp_path / "o", normal=2, abnormal=1, size=32) | kwargs
    with pytest.raises(UserError, match=message):
        synth.generate(args.pop("layout"), args.pop("out"), **args)
    assert not (tmp_path / "o").exists()


def test_bad_base_images_and_output(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        synth.generate("mvtec", tmp_path / "o", base_images=tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/a.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot decode base image .*a.png"):
        synth.generate("mvtec", tmp_path / "o", base_images=tmp_path / "broken")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        synth.generate("mvtec", tmp_path / "file", classes=1, normal=1, abnormal=0, size=32)


def test_fsspec_url_output() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    s = synth.generate("mvtec", "memory://synth-test/out", classes=1, normal=2, abnormal=1, size=32)
    written = fs.find("/synth-test/out")
    assert len(written) == 5 and s.images == 3
    png = fs.cat_file(next(p for p in written if p.endswith("train/good/000.png")))
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == (32, 32, 3)
    fs.rm("/synth-test", recursive=True)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    rc = main(["synth", "--layout", "visa", "--out", str(out), "--class", "synth_pill", "--class", "synth_tile",
               "--normal", "3", "--abnormal", "2", "--size", "40", "--seed", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "synth_pill" in text and "2 classes, 10 images, 4 masks" in text and "images/s" in text
    assert (out / "split_csv/1cls.csv").is_file()
    rc = main(["synth", "--layout", "mvtec", "--out", str(tmp_path / "x"), "--class", "synth_nope"])
    assert rc == 2
    assert "unknown class 'synth_nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------- camera effects


def _reflect101(i: int, n: int) -> int:
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def test_camera_matches_a_float64_reference() -> None:
    """Camera.shoot against float64: bilinear sampling through the homography, the truncated
    Gaussian (border reflected), vignetting and exposure, black level, shot and read noise."""
    h, w = 14, 18
    img = np.random.default_rng(0).random((h, w, 3)).astype(np.float32)
    for seed in range(6):
        cam = draw_camera(np.random.default_rng(seed), h, w, grey=seed % 2 == 0)
        cam.sigma, cam.radius = (0.6, 2) if seed < 4 else (0.0, 0)
        warped = np.zeros((h, w, 3))
        for y in range(h):
            for x in range(w):
                u, v, s = cam.hom @ np.array([x, y, 1.0])
                u, v = u / s, v / s
                x0, y0 = int(np.floor(u)), int(np.floor(v))
                fx, fy = u - x0, v - y0
                px = [_reflect101(x0, w), _reflect101(x0 + 1, w)]
                py = [_reflect101(y0, h), _reflect101(y0 + 1, h)]
                warped[y, x] = ((1 - fx) * (1 - fy) * img[py[0], px[0]] + fx * (1 - fy) * img[py[0], px[1]]
                                + (1 - fx) * fy * img[py[1], px[0]] + fx * fy * img[py[1], px[1]])
        blurred = warped
        if cam.radius:
            k = np.exp(-np.arange(-cam.radius, cam.radius + 1) ** 2 / (2 * cam.sigma**2))
            k /= k.sum()
            rows = np.array([[sum(k[j] * warped[y, _reflect101(x + j - cam.radius, w)] for j in range(len(k)))
                              for x in range(w)] for y in range(h)])
            blurred = np.array([[sum(k[j] * rows[_reflect101(y + j - cam.radius, h), x] for j in range(len(k)))
                                 for x in range(w)] for y in range(h)])
        lin = cam.black + (1 - cam.black - HEADROOM) * blurred * cam.gain.astype(np.float64)
        ref = np.clip(lin + cam.z * np.sqrt(cam.read**2 + cam.shot**2 * np.clip(lin, 0, 1)), 0, 1)
        assert np.abs(cam.shoot(img) - ref).max() < 2e-3, seed
        assert cam.ring == 1 + cam.radius and cam.z.shape[-1] == (1 if seed % 2 == 0 else 3)


def test_camera_effects_are_per_image_and_leave_out_only_a_faint_tail() -> None:
    """Normal images with camera effects differ from the bare render by noise and the rest;
    outside a defect's ring, the camera's own picture of the defect differs from the clean
    twin by a few grey levels at most (what the written image leaves out)."""
    bare = ClassSource("synth_metal", 0, 0, None, 1, camera=False).single(0, 64, None).image.astype(int)
    shot = ClassSource("synth_metal", 0, 0, None, 1).single(0, 64, None).image.astype(int)
    assert np.abs(bare - shot).mean() > 1.0
    src = ClassSource("synth_tile", 0, 12, None, 1)
    for j, spec in enumerate(src.plan):
        rng = src._rng(1, j)
        scene = render_class("synth_tile", rng, 64)
        cam = draw_camera(src._rng(1, j, 7), 64, 64, False)
        img, cov, cam = src._defect(scene, spec, rng, (64, 64), 0.9, cam)
        item = src.single(j, 64, spec)
        far = ~cv2.dilate(item.mask, np.ones((2 * item.ring + 1,) * 2, np.uint8)).astype(bool)
        full = to_uint8(cam.shoot(img)).astype(int)
        assert np.abs(full - item.clean.astype(int)).max(-1)[far].max(initial=0) <= 12
        assert (item.image[far] == item.clean[far]).all()


def test_estimate_cells_finds_the_first_autocorrelation_peak() -> None:
    """The pitch of an image with no known cells against a float64 brute-force circular autocorrelation."""
    yy, xx = np.mgrid[0:40, 0:48]
    img = (0.5 + 0.25 * np.sin(2 * np.pi * xx / 6) + 0.2 * np.sin(2 * np.pi * yy / 10))[..., None].repeat(3, -1)
    cells = estimate_cells(np.random.default_rng(0), img.astype(np.float32))
    g = img.mean(-1) - img.mean()
    ac_x = [float((g * np.roll(g, -k, 1)).sum()) for k in range(16)]
    ac_y = [float((g * np.roll(g, -k, 0)).sum()) for k in range(13)]
    first = [next(i for i in range(3, len(a) - 1) if a[i] >= a[i - 1] and a[i] > a[i + 1]) for a in (ac_x, ac_y)]
    assert (cells.pu, cells.pv) == (6.0, 10.0) == tuple(map(float, first))


def test_configured_source_passes_the_new_settings(tmp_path: Path) -> None:
    spec = SourceSpec(name="s", layout="mvtec", root=str(tmp_path / "root"), split="val",
                      synth=SynthSpec(family="eval", classes=1, normal=1, abnormal=1, size=40, height=32, seed=2))
    synth.generate_source(spec)
    info = json.loads((tmp_path / "root" / synth.INFO_FILE).read_text())
    assert (info["family"], info["classes"], info["height"], info["seed"]) == ("eval", ["synth_wafer"], 32, 2)


def test_a_changed_synth_section_is_refused_on_a_generated_root(tmp_path: Path) -> None:
    """A root generated for one synth: section, then asked for other settings, fails naming what
    differs (rather than the old data being used); the same section, or a root the generator did
    not write, passes; nothing is deleted."""
    from shards.synth.generator import generate_missing

    root = tmp_path / "root"
    base = dict(family="val", classes=1, normal=2, abnormal=1, size=40, seed=3)
    spec = SourceSpec(name="v", layout="btad", root=str(root), split="val", synth=SynthSpec(**base))
    assert generate_missing([spec]) == ["v"]
    assert generate_missing([spec]) == []  # the same section: nothing to do
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for change, said in [({"normal": 5}, "normal=2, but its synth: section asks for normal=5"),
                         ({"seed": 4, "abnormal": 2}, "abnormal=1, seed=3, but its synth: section asks for abnormal=2, seed=4"),
                         ({"defects": ["stain"]}, "defects=None, but its synth: section asks for defects=['stain']"),
                         ({"classes": ["synth_paper"]}, "classes=['synth_weave'], but its synth: section asks for classes=['synth_paper']")]:
        changed = spec.model_copy(update={"synth": SynthSpec(**{**base, **change})})
        with pytest.raises(UserError, match=re.escape(f"source v: {root} holds synthetic data generated with {said}; "
                                                      f"delete {root} (or set another root)")):
            generate_missing([changed])
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files
    (root / synth.INFO_FILE).unlink()  # the user's own data under a synth: section: taken as it is
    generate_missing([spec.model_copy(update={"synth": SynthSpec(**{**base, "normal": 5})})])
