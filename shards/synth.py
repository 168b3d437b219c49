"""Synthetic multi-source industrial anomaly data, written in the public datasets' on-disk layouts.

``generate(layout, out, ...)`` renders product classes (textures and objects, every image a
new instance), renders defects into some of them with exact masks, and writes everything
as MVTec AD, MPDD, VisA, BTAD, MVTec 3D-AD or Real-IAD store it, so that a reader written
for the real dataset reads the output unchanged. ``--base-images DIR`` uses a folder of
the user's own normal images instead of the rendered classes. docs/synth.md describes the
layouts and every detail of them that had to be chosen.

The same arguments and seed give byte-identical files: every image draws its random
numbers from a generator seeded by (seed, class name, role, index), independent of which
other classes are generated and in which order.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from shards.errors import StorageError, UserError
from shards.synth_render import (
    CLASSES,
    DEFECT_TYPES,
    MASK_LEVEL,
    REALIAD_CODES,
    DefectSpec,
    Scene,
    apply_defect,
    plan_defects,
    render_class,
    scene_from_image,
    to_uint8,
    view_homography,
    view_light,
    warp_view,
)

log = logging.getLogger(__name__)

LAYOUTS = ("realiad", "mvtec", "visa", "btad", "mpdd", "mvtec3d")
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
"""All synthetic classes, alternating textures and objects."""
TEXTURE_CLASSES = tuple(n for n, c in CLASSES.items() if c.kind == "texture")
OBJECT_CLASSES = tuple(n for n, c in CLASSES.items() if c.kind == "object")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
BTAD_FORMATS = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
"""BTAD's image and mask formats per product, as in the original archive."""
REALIAD_DIR = "realiad_512"
REALIAD_CANVAS = 1.35
"""A Real-IAD sample is rendered on a canvas this much larger than a view, then shot from each view."""
INFO_FILE = "synth_info.json"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass
class SynthSummary:
    """What a generate() call wrote."""

    layout: str
    out: str
    classes: dict[str, dict[str, int]] = field(default_factory=dict)
    defects: Counter = field(default_factory=Counter)
    images: int = 0
    masks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    mask_areas: list[tuple[str, str, float]] = field(default_factory=list)
    """(class, defect type, mask area as a fraction of the image) for every abnormal image."""

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        lines = [f"synthetic {self.layout} data in {self.out}", f"{'class':<16} {'normal':>7} {'abnormal':>9}"]
        for name, c in self.classes.items():
            lines.append(f"{name:<16} {c['normal']:>7} {c['abnormal']:>9}")
        lines.append("defects per type: " + ", ".join(f"{k} {v}" for k, v in sorted(self.defects.items())))
        if self.mask_areas:
            areas = [a for _, _, a in self.mask_areas]
            lines.append(f"defect area: {100 * min(areas):.3f}% .. {100 * max(areas):.2f}% of the image")
        lines.append(
            f"{len(self.classes)} classes, {self.images} images, {self.masks} masks, "
            f"{self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
        )
        return "\n".join(lines)


@dataclass
class _Item:
    """One written image: the defective (or normal) picture, its mask, and its defect type."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None  # (H, W) uint8 0/255, None for a normal image
    defect: str | None
    clean: np.ndarray  # the same instance without the defect (the image itself when normal)


# --------------------------------------------------------------------------- output


class _Sink:
    """Writes files under the output root: locally to a temporary name then renamed, or
    through fsspec (one object put each) for a URL."""

    def __init__(self, out: str | Path) -> None:
        text = str(out)
        self.remote = "://" in text and not text.startswith("file://")
        if self.remote:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(text)
            except (ImportError, ValueError) as e:
                raise UserError(f"synth: cannot open output URL {text!r}: {e}") from None
        else:
            self.root = Path(text.removeprefix("file://"))
            if self.root.exists() and not self.root.is_dir():
                raise UserError(f"synth: output {str(self.root)!r} is a file; give a folder (it is created if missing)")
        self.bytes = 0
        self._dirs: set[Path] = set()

    def write(self, rel: str, data: bytes) -> None:
        if self.remote:
            path = f"{self.root.rstrip('/')}/{rel}"
            try:
                self.fs.pipe_file(path, data)
            except Exception as e:  # noqa: BLE001 - any backend failure is reported with the path
                raise StorageError(f"synth: cannot write {path}: {e}") from e
        else:
            path = self.root / rel
            tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
            try:
                if path.parent not in self._dirs:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._dirs.add(path.parent)
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise UserError(f"synth: cannot write {path}: {e.strerror or e}; check that the folder is writable") from e
        self.bytes += len(data)


def _encode(img: np.ndarray, suffix: str) -> bytes:
    if suffix == ".tiff":
        buf = io.BytesIO()
        tifffile.imwrite(buf, img, photometric="rgb", compression="zlib")
        return buf.getvalue()
    arr = img[..., ::-1] if img.ndim == 3 else img
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix.lower() == ".jpg" else []
    ok, buf = cv2.imencode(suffix.lower(), np.ascontiguousarray(arr), params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {suffix} image")
    return buf.tobytes()


# --------------------------------------------------------------------------- per-class sources


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


class _Source:
    """Normal scenes of one class (rendered, or the user's images) and its planned defects."""

    def __init__(self, name: str, seed: int, abnormal: int, base_files: list[Path] | None, normal: int) -> None:
        self.name = name
        self.seed = seed
        self.base_files = base_files
        self.plan = plan_defects(self._rng(2, 0), abnormal)
        if base_files is not None:
            self.normal_files = base_files[:normal]
            self.abnormal_files = base_files[normal:] or base_files

    def _rng(self, role: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _seed_of(self.name), role, index])

    def _scene(self, role: int, index: int, size: int, rng: np.random.Generator, canvas: int | None = None) -> Scene:
        if self.base_files is None:
            return render_class(self.name, rng, size, canvas)
        files = self.normal_files if role == 0 else self.abnormal_files
        return scene_from_image(_read_rgb(files[index % len(files)]), canvas or size)

    def _defect(self, scene: Scene, spec: DefectSpec, rng: np.random.Generator, size: int, region: float):
        for _ in range(8):
            img, cov = apply_defect(scene, spec, rng, size, region)
            if np.count_nonzero(cov >= MASK_LEVEL) >= 4:
                return img, cov
        raise RuntimeError(f"{self.name}: could not place a visible {spec.kind} defect")

    def single(self, index: int, size: int, spec: DefectSpec | None) -> _Item:
        """A normal image (spec None) or an abnormal one, ``index`` counting within its role."""
        role = 0 if spec is None else 1
        rng = self._rng(role, index)
        scene = self._scene(role, index, size, rng)
        clean = to_uint8(scene.image)
        if spec is None:
            return _Item(clean, None, None, clean)
        img, cov = self._defect(scene, spec, rng, size, 0.9)
        return _Item(to_uint8(img), np.where(cov >= MASK_LEVEL, 255, 0).astype(np.uint8), spec.kind, clean)

    def views(self, index: int, size: int, views: int, spec: DefectSpec | None) -> list[_Item]:
        """One physical sample shot from ``views`` cameras: C1 from above, the others tilted
        from four sides, each with its own scale and lighting. A view that does not show the
        defect is a normal image."""
        role = 0 if spec is None else 1
        rng = self._rng(role, index)
        canvas = round(size * REALIAD_CANVAS)
        scene = self._scene(role, index, size, rng, canvas)
        img, cov = (scene.image, None) if spec is None else self._defect(scene, spec, rng, size, 0.5)
        items = []
        for v in range(views):
            hom = view_homography(rng, v, size, canvas)
            gain = view_light(rng, size)
            clean = to_uint8(warp_view(scene.image, hom, size) * gain)
            mask = None if cov is None else warp_view(cov, hom, size) >= MASK_LEVEL
            if mask is not None and mask.any():
                # interpolation spreads faint residues of the ring; keep changes within one pixel of the mask
                ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                shot = np.where(ring[..., None], to_uint8(warp_view(img, hom, size) * gain), clean)
                items.append(_Item(shot, np.where(mask, 255, 0).astype(np.uint8), spec.kind, clean))
            else:
                items.append(_Item(clean, None, None, clean))
        return items


def _read_rgb(path: Path) -> np.ndarray:
    data = np.fromfile(path, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise UserError(f"synth: cannot decode base image {str(path)!r}; remove it or convert it to PNG/JPEG")
    return img[..., ::-1]


def _base_files(base_images: str | Path) -> list[Path]:
    root = Path(base_images)
    if not root.is_dir():
        raise UserError(f"synth: --base-images {str(root)!r} is not a folder; give a folder of normal jpg/png images")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(
            f"synth: --base-images {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "put the normal images of the product directly in that folder"
        )
    return files


# --------------------------------------------------------------------------- layouts


class _Run:
    """The state of one generate() call shared by the layout writers."""

    def __init__(self, layout: str, sink: _Sink, names: list[str], normal: int, abnormal: int, size: int,
                 views: int, seed: int, base: list[Path] | None, bar: tqdm) -> None:
        self.layout, self.sink, self.names = layout, sink, names
        self.normal, self.abnormal, self.size, self.views, self.seed = normal, abnormal, size, views, seed
        self.base, self.bar = base, bar
        self.summary = SynthSummary(layout, str(sink.root))

    def sources(self) -> Iterator[_Source]:
        for name in self.names:
            self.summary.classes[name] = {"normal": 0, "abnormal": 0}
            yield _Source(name, self.seed, self.abnormal, self.base, self.normal)

    def image(self, cls: str, rel: str, item: _Item, suffix: str) -> None:
        self.sink.write(rel, _encode(item.image, suffix))
        self.summary.images += 1
        self.summary.classes[cls]["abnormal" if item.mask is not None else "normal"] += 1
        if item.mask is not None:
            self.summary.defects[item.defect] += 1
            self.summary.mask_areas.append((cls, item.defect, float(np.count_nonzero(item.mask)) / item.mask.size))
        self.bar.update(1)

    def mask(self, rel: str, mask: np.ndarray, suffix: str) -> None:
        self.sink.write(rel, _encode(mask, suffix))
        self.summary.masks += 1

    def text(self, rel: str, text: str) -> None:
        self.sink.write(rel, text.encode())


def _split(n: int, validation: bool = False) -> tuple[int, int, int]:
    """(train, validation, test) counts of n normal images: about 20 % test (10 % validation)."""
    test = max(1, round(0.2 * n)) if n >= 2 else 0
    val = max(1, round(0.1 * n)) if validation and n >= 3 else 0
    return n - test - val, val, test


def _width(n: int, minimum: int) -> int:
    """Zero-padding that gives every file of a folder of n files the same name length."""
    return max(minimum, len(str(max(n - 1, 0))))


def _write_mvtec(run: _Run) -> None:
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


def _write_visa(run: _Run) -> None:
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


def _write_btad(run: _Run) -> None:
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


def _write_mvtec3d(run: _Run) -> None:
    """MVTec 3D-AD: <cls>/{train,validation,test}/<good|defect>/{rgb,gt,xyz}/NNN.{png,tiff}.

    gt exists for every test image (all zero for test/good), as in the original; xyz is an
    all-zero (no valid point) organised point cloud of the image's size."""
    xyz = _encode(np.zeros((run.size, run.size, 3), np.float32), ".tiff")
    empty = np.zeros((run.size, run.size), np.uint8)

    def put(cls: str, folder: str, stem: str, item: _Item, gt: bool) -> None:
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
    t = datetime(2023, 9, 1, 8, 0, 0) + timedelta(seconds=_seed_of(cls) % 86400 + 53 * sample)
    return t.strftime("%Y%m%d%H%M%S")


def _write_realiad(run: _Run) -> None:
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


_WRITERS: dict[str, Callable[[_Run], None]] = {
    "mvtec": _write_mvtec,
    "mpdd": _write_mvtec,
    "visa": _write_visa,
    "btad": _write_btad,
    "mvtec3d": _write_mvtec3d,
    "realiad": _write_realiad,
}


# --------------------------------------------------------------------------- entry points


def _class_list(classes: int | list[str], layout: str, base: list[Path] | None, base_images) -> list[str]:
    if base is not None:
        if isinstance(classes, (list, tuple)):
            if len(classes) != 1:
                raise UserError(
                    f"synth: --base-images makes one class from the folder; give at most one --class NAME (got {list(classes)})"
                )
            name = classes[0]
            if not _NAME_RE.fullmatch(name):
                raise UserError(f"synth: class name {name!r} must match [a-z0-9][a-z0-9_-]* (it names folders)")
            return [name]
        stem = re.sub(r"[^a-z0-9]+", "_", Path(base_images).resolve().name.lower()).strip("_") or "images"
        return [f"synth_{stem}"]
    if isinstance(classes, (list, tuple)):
        unknown = [c for c in classes if c not in CLASS_NAMES]
        if unknown:
            raise UserError(f"synth: unknown class {', '.join(map(repr, unknown))}; valid classes: {', '.join(CLASS_NAMES)}")
        if not classes or len(set(classes)) != len(classes):
            raise UserError(f"synth: give each class once (got {list(classes)})")
        names = list(classes)
    else:
        if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= len(CLASS_NAMES):
            raise UserError(f"synth: --classes must be between 1 and {len(CLASS_NAMES)} (got {classes!r})")
        names = list(CLASS_NAMES[:classes])
    if layout == "btad" and len(names) > len(BTAD_FORMATS):
        raise UserError(
            f"synth: the btad layout has three products (01, 02, 03); asked for {len(names)} classes. Use --classes 3 or fewer"
        )
    return names


def generate(
    layout: str,
    out: str | Path,
    *,
    classes: int | list[str] = 4,
    normal: int = 20,
    abnormal: int = 10,
    size: int = 256,
    views: int = 5,
    seed: int = 0,
    base_images: str | Path | None = None,
    progress: bool = False,
) -> SynthSummary:
    """Write synthetic normal and abnormal images of ``classes`` in ``layout`` under ``out``.

    ``classes``: the first N of :data:`CLASS_NAMES`, or a list of names. ``normal`` and
    ``abnormal``: images per class (physical samples for realiad, each shot in ``views``
    views). ``base_images``: a folder of the user's normal images, used as the one class
    (its name from the folder, or the single name in ``classes``); defects are rendered
    onto them. Files are written to a temporary name and renamed.
    """
    if layout not in LAYOUTS:
        raise UserError(f"synth: unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    for key, value, lo, hi in (("normal", normal, 1, None), ("abnormal", abnormal, 0, None),
                               ("size", size, 32, 4096), ("views", views, 1, 5)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise UserError(f"synth: --{key} must be an integer {bound} (got {value!r})")
    base = _base_files(base_images) if base_images is not None else None
    names = _class_list(classes, layout, base, base_images)
    if base is not None and len(base) < normal:
        log.warning("synth: %s holds %d images, fewer than --normal %d; using all of them as normal images",
                    base_images, len(base), normal)
        normal = len(base)
    per_class = (normal + abnormal) * (views if layout == "realiad" else 1)
    sink = _Sink(out)
    start = time.perf_counter()
    with tqdm(total=per_class * len(names), disable=not progress, unit="img", desc=f"synth {layout}") as bar:
        run = _Run(layout, sink, names, normal, abnormal, size, views, seed, base, bar)
        _WRITERS[layout](run)
    info = {
        "synthetic": True,
        "generator": "adpretrain synth",
        "layout": layout,
        "classes": names,
        "normal": normal,
        "abnormal": abnormal,
        "size": size,
        "views": views if layout == "realiad" else 1,
        "seed": seed,
        "base_images": str(base_images) if base_images is not None else None,
        "defect_types": list(DEFECT_TYPES),
    }
    if layout == "btad":
        info["products"] = dict(zip(BTAD_FORMATS, names))
    if layout == "realiad":
        info["realiad_codes"] = REALIAD_CODES
    sink.write(INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    summary = run.summary
    summary.bytes = sink.bytes
    summary.seconds = time.perf_counter() - start
    log.info("synth: wrote %d images of %d classes (%s layout) to %s", summary.images, len(names), layout, summary.out)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``adpretrain synth``."""
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="on-disk layout of a public dataset")
    parser.add_argument("--out", required=True, help="output folder (created if missing), or an fsspec URL")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", type=int, default=4, metavar="N",
                       help=f"the first N classes of: {', '.join(CLASS_NAMES)} (default 4)")
    group.add_argument("--class", dest="class_names", action="append", metavar="NAME",
                       help="a class by name (repeat for several)")
    parser.add_argument("--normal", type=int, default=20, help="normal images per class (samples in realiad; default 20)")
    parser.add_argument("--abnormal", type=int, default=10, help="abnormal images per class (samples in realiad; default 10)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--views", type=int, default=5, help="camera views per sample, realiad only (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--base-images", default=None, metavar="DIR",
                        help="folder of your own normal images (jpg/png): the normal class, with synthetic defects")


def generate_from_args(args: argparse.Namespace) -> SynthSummary:
    """``adpretrain synth``: generate with a progress bar from the parsed flags."""
    return generate(
        args.layout,
        args.out,
        classes=args.class_names if args.class_names else args.classes,
        normal=args.normal,
        abnormal=args.abnormal,
        size=args.size,
        views=args.views,
        seed=args.seed,
        base_images=args.base_images,
        progress=True,
    )
