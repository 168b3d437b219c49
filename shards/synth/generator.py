"""The entry points of the synthetic data: :func:`generate` (checks its arguments, picks the
classes, runs the layout's writer and writes ``synth_info.json``), the flags of
``adpretrain synth``, and :func:`generate_source`, the synthetic data of a configured source
whose root does not exist yet."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from shards import storage
from shards.errors import UserError
from shards.spec import SourceSpec
from shards.synth.defects import DEFECT_TYPES, REALIAD_CODES
from shards.synth.layouts import BTAD_FORMATS, SYNTH_LAYOUTS, WRITERS
from shards.synth.base import BASE_MODES, Piece, list_base_images, tiles
from shards.synth.families import (FAMILY_NAMES, FAMILY_OF_CLASS, chosen_defects, defect_types, family_classes,
                                   get_family)
from shards.synth.output import Options, Run, Sink, SynthSummary
from shards.synth.products import CLASS_NAMES


log = logging.getLogger(__name__)

INFO_FILE = "synth_info.json"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")


def _class_list(classes, family: str | None, layout: str, base: list | None, base_images) -> list[str]:
    if base is not None:
        if family is not None:
            get_family(family)
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
    names = family_classes(family, classes)
    if layout == "btad" and len(names) > len(BTAD_FORMATS):
        raise UserError(
            f"synth: the btad layout has three products (01, 02, 03); asked for {len(names)} classes"
            f"{f' (family {family!r})' if family else ''}. Use --classes 3 or fewer"
        )
    return names


def _base_pieces(base_images, base_mode: str, tile: int | None, size: int, height: int | None) -> list[Piece] | None:
    """The pieces of the user's images: one per image (whole), or every tile of every image."""
    if base_mode not in BASE_MODES:
        raise UserError(f"synth: --base-mode must be one of {', '.join(BASE_MODES)} (got {base_mode!r})")
    if base_images is None:
        if base_mode != "whole" or tile is not None:
            raise UserError("synth: --base-mode tile and --tile cut the images of --base-images DIR; give --base-images too")
        return None
    files = list_base_images(base_images)
    if base_mode == "whole":
        if tile is not None:
            raise UserError("synth: --tile applies to --base-mode tile only; add --base-mode tile or leave out --tile")
        return [Piece(f) for f in files]
    tw = size if tile is None else tile
    return tiles(files, tw, round(tw * (height or size) / size))


def generate(
    layout: str,
    out: str | Path,
    *,
    classes: int | list[str] | None = None,
    normal: int = 20,
    abnormal: int = 10,
    size: int = 256,
    height: int | None = None,
    views: int = 5,
    seed: int = 0,
    family: str | None = None,
    defects: list[str] | None = None,
    base_images: str | Path | None = None,
    base_mode: str = "whole",
    tile: int | None = None,
    camera: bool = True,
    progress: bool = False,
) -> SynthSummary:
    """Write synthetic normal and abnormal images of ``classes`` in ``layout`` under ``out``.

    ``classes``: the first N classes (of ``family``, or of :data:`CLASS_NAMES`), or a list of
    names; default the family's classes (4 without one). ``normal`` and ``abnormal``: images
    per class (physical samples for realiad, each shot in ``views`` views). ``size`` x
    ``height`` (default square). ``base_images``: a folder of the user's normal images, used
    as the one class (its name from the folder, or the single name in ``classes``), whole or
    cut into ``tile``-wide tiles (``base_mode``); defects of ``family`` (every type without
    one) are rendered onto them. ``defects``: only these of the classes' defect types (of
    ``family``'s; every class with abnormal images must take one of them); default all.
    ``camera``: real-camera effects on the rendered classes.
    Files are written to a temporary name and renamed.
    """
    _check_args(layout, normal, abnormal, size, views, height, tile)
    base = _base_pieces(base_images, base_mode, tile, size, height)
    names = _class_list(classes, family, layout, base, base_images)
    chosen = chosen_defects(defects, family, names if base is None and abnormal else [])
    if base is not None and len(base) < normal:
        log.warning("synth: %s holds %d %s, fewer than --normal %d; using all of them as normal images",
                    base_images, len(base), "tiles" if base_mode == "tile" else "images", normal)
        normal = len(base)
    opts = Options(names, normal, abnormal, size, height, views, seed, base, family, chosen, bool(camera))
    per_class = (normal + abnormal) * (views if layout == "realiad" else 1)
    sink = Sink(out)
    start = time.perf_counter()
    with tqdm(total=per_class * len(names), disable=not progress, unit="img", desc=f"synth {layout}") as bar:
        run = Run(layout, sink, opts, bar)
        WRITERS[layout](run)
    info = _info(layout, opts, base_images, base_mode)
    sink.write(INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    summary = run.summary
    summary.bytes = sink.bytes
    summary.seconds = time.perf_counter() - start
    log.info("synth: wrote %d images of %d classes (%s layout) to %s", summary.images, len(names), layout, summary.out)
    return summary


def _check_args(layout: str, normal: int, abnormal: int, size: int, views: int, height: int | None,
                tile: int | None) -> None:
    if layout not in SYNTH_LAYOUTS:
        raise UserError(f"synth: unknown layout {layout!r}; valid layouts: {', '.join(SYNTH_LAYOUTS)}")
    checks = [("normal", normal, 1, None), ("abnormal", abnormal, 0, None), ("size", size, 32, 4096), ("views", views, 1, 5)]
    checks += [("height", height, 32, 4096)] if height is not None else []
    checks += [("tile", tile, 16, 16384)] if tile is not None else []
    for key, value, lo, hi in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise UserError(f"synth: --{key} must be an integer {bound} (got {value!r})")


def _info(layout: str, opts: Options, base_images: str | Path | None, base_mode: str) -> dict:
    """The contents of ``synth_info.json``: the data is synthetic, and how it was made."""
    types = [t for t in DEFECT_TYPES if any(t in defect_types(None if opts.base else n, opts.family, opts.defects)
                                          for n in opts.names)]
    info = {
        "synthetic": True,
        "generator": "adpretrain synth",
        "layout": layout,
        "classes": opts.names,
        "family": opts.family,
        "defects": list(opts.defects) if opts.defects is not None else None,
        "families": {n: FAMILY_OF_CLASS.get(n) for n in opts.names} if opts.base is None else {},
        "normal": opts.normal,
        "abnormal": opts.abnormal,
        "size": opts.size,
        "height": opts.height or opts.size,
        "views": opts.views if layout == "realiad" else 1,
        "seed": opts.seed,
        "camera": opts.camera and opts.base is None,
        "base_images": str(base_images) if base_images is not None else None,
        "base_mode": base_mode if base_images is not None else None,
        "tiles": len(opts.base) if opts.base is not None and base_mode == "tile" else None,
        "defect_types": types,
    }
    if layout == "btad":
        info["products"] = dict(zip(BTAD_FORMATS, opts.names))
    if layout == "realiad":
        info["realiad_codes"] = {t: REALIAD_CODES[t] for t in types}
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``adpretrain synth``."""
    parser.add_argument("--layout", required=True, choices=SYNTH_LAYOUTS, help="on-disk layout of a public dataset")
    parser.add_argument("--out", required=True, help="output folder (created if missing), or an fsspec URL")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", type=int, default=None, metavar="N",
                       help="the first N classes of the family, or of all classes (default: the family's, or 4): "
                       + ", ".join(CLASS_NAMES))
    group.add_argument("--class", dest="class_names", action="append", metavar="NAME",
                       help="a class by name (repeat for several)")
    parser.add_argument("--family", default=None, choices=FAMILY_NAMES,
                        help="classes and defect types of one family (see docs/synth.md)")
    parser.add_argument("--defect", dest="defects", action="append", metavar="TYPE",
                        help="a defect type to paint, repeatable (default: every type of the family, or of all)")
    parser.add_argument("--normal", type=int, default=20, help="normal images per class (samples in realiad; default 20)")
    parser.add_argument("--abnormal", type=int, default=10, help="abnormal images per class (samples in realiad; default 10)")
    parser.add_argument("--size", type=int, default=256, help="image width in pixels (default 256)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: --size, square)")
    parser.add_argument("--views", type=int, default=5, help="camera views per sample, realiad only (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--no-camera", dest="camera", action="store_false",
                        help="no camera effects (noise, vignetting, blur, perspective) on the rendered classes")
    parser.add_argument("--base-images", default=None, metavar="DIR",
                        help="folder of your own normal images (jpg/png): the normal class, with synthetic defects")
    parser.add_argument("--base-mode", default="whole", choices=BASE_MODES,
                        help="whole: each base image is one image; tile: cut them into tiles (default whole)")
    parser.add_argument("--tile", type=int, default=None, metavar="PX",
                        help="tile width in pixels of the base images, tile mode only (default: --size)")


def generate_from_args(args: argparse.Namespace) -> SynthSummary:
    """``adpretrain synth``: generate with a progress bar from the parsed flags."""
    return generate(
        args.layout,
        args.out,
        classes=args.class_names if args.class_names else args.classes,
        normal=args.normal,
        abnormal=args.abnormal,
        size=args.size,
        height=args.height,
        views=args.views,
        seed=args.seed,
        family=args.family,
        defects=args.defects,
        base_images=args.base_images,
        base_mode=args.base_mode,
        tile=args.tile,
        camera=args.camera,
        progress=True,
    )


def needs_generating(spec: SourceSpec) -> bool:
    """The source asks for synthetic data (``synth:``) and its root does not exist yet."""
    return spec.synth is not None and not storage.exists(spec.root)


def generate_source(spec: SourceSpec, progress: bool = False) -> None:
    """Generate the source's synthetic data into its root, completely or not at all: written
    beside the root first, then renamed into place (put in one go under a URL)."""
    s = spec.synth
    log.info("source %s: %s does not exist; generating synthetic %s data there", spec.name, spec.root, spec.layout)
    local = not storage.is_remote(spec.root)
    parent = os.path.dirname(os.path.abspath(spec.root)) if local else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)
    try:
        out = os.path.join(tmp, "root")
        generate(spec.layout, out, classes=s.classes, normal=s.normal, abnormal=s.abnormal, size=s.size,
                 height=s.height, views=s.views, seed=s.seed, family=s.family, defects=s.defects,
                 base_images=s.base_images, base_mode=s.base_mode, tile=s.tile, camera=s.camera, progress=progress)
        if local:
            os.replace(out, spec.root)
        else:
            fs, path = storage.filesystem(spec.root)
            with storage.storage_errors(spec.root):
                fs.put(out.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_generated(spec: SourceSpec) -> None:
    """A root this generator wrote for ``spec.synth`` holds what the section asks for now: a changed
    section (more images, another seed, ...) is refused, naming what differs, rather than training
    or evaluating on the data of the old one. Roots without ``synth_info.json`` are the user's."""
    s, path = spec.synth, storage.join(spec.root, INFO_FILE)
    if s is None or not storage.exists(path):
        return
    info = json.loads(storage.read_bytes(path))
    if info.get("generator") != "adpretrain synth":
        return
    want = {"layout": spec.layout, "abnormal": s.abnormal, "size": s.size, "height": s.height or s.size,
            "seed": s.seed, "family": s.family, "views": s.views if spec.layout == "realiad" else 1}
    if s.base_images is None:  # base images: their count (and so the classes and normal images) come from the folder
        names = _class_list(s.classes, s.family, spec.layout, None, None)
        chosen = chosen_defects(s.defects, s.family, names if s.abnormal else [])
        want.update(classes=names, normal=s.normal, camera=s.camera, defects=list(chosen) if chosen is not None else None)
    else:
        want.update(base_images=s.base_images, base_mode=s.base_mode)
    diff = [k for k, v in want.items() if info.get(k) != v]
    if diff:
        made = ", ".join(f"{k}={info.get(k)!r}" for k in diff)
        asked = ", ".join(f"{k}={want[k]!r}" for k in diff)
        raise UserError(f"source {spec.name}: {spec.root} holds synthetic data generated with {made}, but its synth: "
                        f"section asks for {asked}; delete {spec.root} (or set another root) to generate it anew")


def generate_missing(sources: list[SourceSpec], progress: bool = False) -> list[str]:
    """Generate the synthetic data of every source that needs it (checking the roots generated
    before: :func:`check_generated`); the names of those generated."""
    for s in sources:
        if not needs_generating(s):
            check_generated(s)
    made = [s for s in sources if needs_generating(s)]
    for s in made:
        generate_source(s, progress)
    return [s.name for s in made]
