"""Every file under a source root is accounted for: read, quarantined with a reason, or ignored
by a documented rule, and ``inputs`` equals what ``find ROOT -type f -o ! -type d`` counts;
nothing that is not a regular file is ever opened."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.stages import Context, shards as shards_stage
from shards.manifest import summary_table
from shards.record import BadInput, load_sample, read_inputs
from shards.sources import scan_source
from test_sources import folder_from_mvtec, spec, synth

LAYOUTS = ["realiad", "mvtec", "mpdd", "visa", "btad", "mvtec3d", "folder"]


def find_count(root: Path) -> int:
    out = subprocess.run(["find", str(root), "-type", "f", "-o", "!", "-type", "d"], capture_output=True,
                         text=True, check=True).stdout
    return len(out.splitlines())


def png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def make_socket(path: Path) -> None:
    """A Unix socket file at ``path`` (bound at a short path first: AF_UNIX paths are limited to 108 bytes)."""
    d = tempfile.mkdtemp(dir="/tmp")
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.path.join(d, "s"))
        os.rename(os.path.join(d, "s"), path)
    finally:
        shutil.rmtree(d)


def layout_tree(tmp_path: Path, layout: str) -> Path:
    if layout == "folder":
        return folder_from_mvtec(tmp_path)
    root, _ = synth(tmp_path, layout, classes=2, normal=3, abnormal=2)
    return root


# Misplaced files of each layout, relative to a class folder ({c}) or the root, with the start of the reason.
MISPLACED = {
    "mvtec": {"{c}/train/crack/x.png": "unexpected location for layout mvtec: <class>/train/crack/",
              "{c}/test/loose.png": "unexpected location for layout mvtec: <class>/test/",
              "{c}/validation/good/x.png": "unexpected location for layout mvtec: <class>/validation/good/",
              "{c}/train/good/nested/x.png": "unexpected location for layout mvtec: <class>/train/good/nested/",
              "{c}/ground_truth/{d}/zzz_mask.png": "not the mask of any image"},
    "folder": {"{c}/good/nested/x.png": "unexpected location for layout folder: <class>/good/nested/",
               "{c}/good/sub/deeper/x.png": "unexpected location for layout folder: <class>/good/sub/deeper/",
               "{c}/masks/{d}/zzz.png": "not the mask of any image",
               "{c}/masks/{d}/{s}.jpg": "not the mask of any image"},
    "visa": {"{c}/Data/Images/Other/x.JPG": "unexpected location for layout visa: <class>/Data/Images/Other/",
             "{c}/Data/Masks/Anomaly/zzz.png": "not the mask of any image"},
    "btad": {"{c}/train/ko/x.bmp": "unexpected location for layout btad: <class>/train/ko/",
             "{c}/ground_truth/ko/zzz.png": "not the mask of any image"},
    "mvtec3d": {"{c}/train/good/x.png": "unexpected location for layout mvtec3d: <class>/train/good/",
                "{c}/test/{d}/gt/zzz.png": "not the mask of any image"},
    "realiad": {"{c}/OK/x.jpg": "unexpected location for layout realiad: realiad_512/<class>/OK/",
                "{c}/NG/{d}/zzz.png": "unexpected location for layout realiad: realiad_512/<class>/NG/<d>/"},
}
MISPLACED["mpdd"] = {k: v.replace("layout mvtec", "layout mpdd") for k, v in MISPLACED["mvtec"].items()}


def add_strays(root: Path, layout: str) -> dict[str, str]:
    """A stray of every kind in a generated tree: path -> the start of its quarantine reason
    (hidden files are not in it: they are ignored)."""
    scan = scan_source(spec(layout, root))
    normal = next(r for r in scan.records if r.label == 0)
    abnormal = next(r for r in scan.records if r.label == 1)
    cls_dir = root / normal.path.split("/")[0] if layout != "realiad" else root / "realiad_512" / normal.cls
    image_dir = root / Path(normal.path).parent
    defect = abnormal.defect
    expected = {}
    for rel, reason in MISPLACED[layout].items():
        rel = rel.format(c=str(cls_dir.relative_to(root)), d=defect, s=Path(abnormal.path).stem)
        png(root / rel)
        expected[rel] = reason.replace("<d>", defect)
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    os.mkfifo(image_dir / "pipe.png")
    expected[rel(image_dir / "pipe.png")] = "named pipe (FIFO), not a regular file"
    make_socket(image_dir / "sock.png")
    expected[rel(image_dir / "sock.png")] = "socket, not a regular file"
    (image_dir / "broken.png").symlink_to(image_dir / "gone.png")
    expected[rel(image_dir / "broken.png")] = "broken symlink"
    (image_dir / "notes.txt").write_text("not an image")
    expected[rel(image_dir / "notes.txt")] = ""  # the reason depends on the layout (split file or extension)
    png(root / "stray.png")
    expected["stray.png"] = f"unexpected location for layout {layout}: the root folder"
    (image_dir / ".DS_Store").write_bytes(b"\0")
    (root / ".cache").mkdir()
    (root / ".cache" / "thumbs.png").write_bytes(b"\0")
    return expected


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_file_is_read_quarantined_or_ignored(tmp_path, layout):
    root = layout_tree(tmp_path, layout)
    clean = scan_source(spec(layout, root))
    assert clean.quarantined == []
    assert clean.inputs == find_count(root)
    expected = add_strays(root, layout)
    scan = scan_source(spec(layout, root))
    got = {q.path: q.reason for q in scan.quarantined}
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for path, reason in expected.items():
        assert got[path].startswith(reason), (path, got[path])
    assert scan.ignored["hidden files"] == 2
    masks = {r.mask_path for r in scan.records if r.mask_path}
    assert len(scan.records) == len(clean.records)
    assert scan.inputs == find_count(root) == len(scan.records) + len(masks) + len(got) + sum(scan.ignored.values())


def test_ignored_rules(tmp_path):
    # mvtec3d: point clouds and the empty masks of good images are not read, but counted.
    root = layout_tree(tmp_path, "mvtec3d")
    scan = scan_source(spec("mvtec3d", root))
    n_xyz = sum(1 for _ in root.rglob("xyz/*"))
    n_good_gt = sum(1 for p in root.rglob("gt/*") if p.parent.parent.name == "good")
    assert n_xyz and n_good_gt
    assert scan.ignored == {"point clouds (xyz/, not read)": n_xyz, "masks of normal images (not read)": n_good_gt,
                            "non-image files in the root (readme, license)": 1}
    # Classes not selected and, with masks: none, the masks are counted as ignored.
    root = layout_tree(tmp_path, "mvtec")
    first, second = sorted(p.name for p in root.iterdir() if p.is_dir())
    scan = scan_source(spec("mvtec", root, classes=[first], masks="none"))
    n_masks = sum(1 for _ in (root / first).rglob("*_mask.png"))
    assert scan.ignored["classes not selected"] == sum(1 for p in (root / second).rglob("*") if p.is_file())
    assert scan.ignored["masks (masks: none)"] == n_masks > 0
    assert scan.quarantined == []
    # The root of a source with one class selected: inputs are still every file under it.
    assert scan.inputs == find_count(root)


def test_mask_of_a_quarantined_image_is_quarantined_too(tmp_path):
    root = layout_tree(tmp_path, "mvtec")
    scan = scan_source(spec("mvtec", root))
    rec, other = [r for r in scan.records if r.label == 1][:2]
    renamed = (root / rec.path).rename((root / rec.path).with_suffix(".txt"))  # quarantined: not an image
    (root / other.path).unlink()  # its mask stays without its image
    after = scan_source(spec("mvtec", root))
    got = {q.path: q.reason for q in after.quarantined}
    assert got[str(renamed.relative_to(root))].startswith("not an image file")
    assert got[rec.mask_path] == f"mask of a quarantined image ({renamed.relative_to(root)})"
    assert got[other.mask_path].startswith("not the mask of any image")
    assert len(got) == 3 and after.inputs == find_count(root)


@pytest.mark.timeout(30)
def test_reading_a_fifo_or_socket_does_not_block(tmp_path):
    fifo, sock = tmp_path / "pipe.png", tmp_path / "sock.png"
    os.mkfifo(fifo)
    make_socket(sock)
    got = read_inputs([str(fifo), str(sock)])
    assert str(got[str(fifo)]).startswith("named pipe (FIFO), not a regular file")
    assert isinstance(got[str(sock)], BadInput) and "cannot read the file" in str(got[str(sock)])


@pytest.mark.timeout(60)
def test_file_replaced_by_a_fifo_after_the_scan_is_quarantined_not_waited_on(tmp_path):
    root = layout_tree(tmp_path, "mvtec")
    rec = scan_source(spec("mvtec", root)).records[0]
    (root / rec.path).unlink()
    os.mkfifo(root / rec.path)
    with pytest.raises(BadInput, match=r"named pipe \(FIFO\)"):
        load_sample(rec)


@pytest.mark.timeout(600)
def test_build_with_strays_in_every_layout_finishes_and_counts_every_file(ray_local, tmp_path):
    roots = {}
    for layout in LAYOUTS:
        roots[layout] = layout_tree(tmp_path / layout, layout)
        add_strays(roots[layout], layout)
    cfg = load_config({
        "name": "strays",
        "sources": [{"name": f"s-{layout}", "layout": layout, "root": str(root), "split": "pretrain"}
                    for layout, root in roots.items()],
        "shards": {"url": str(tmp_path / "shards"), "max_quarantine_fraction": 0.9},
        "backbone": {"levels": [1], "weights": "random"},
        "train": {"steps": 1, "storage": str(tmp_path / "train")},
    })
    manifest = shards_stage.run(cfg, Context())
    quarantined = {(q["source"], q["path"]) for q in manifest["quarantined"]}
    for layout, root in roots.items():
        s = manifest["sources"][f"s-{layout}"]
        assert s["inputs"] == find_count(root) == s["written"] + s["quarantined"] + s["ignored"], (layout, s)
        assert s["ignored_by_rule"]["hidden files"] == 2
        fifo = next(str(p.relative_to(root)) for p in root.rglob("pipe.png"))
        assert (f"s-{layout}", fifo) in quarantined
    t = manifest["totals"]
    assert t["inputs"] == sum(find_count(r) for r in roots.values())
    assert (f"{t['inputs']} inputs = {t['written']} written + {t['quarantined']} quarantined + {t['ignored']} ignored"
            in summary_table(manifest))
