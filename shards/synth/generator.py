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
from shards.synth.output import Run, Sink, SynthSummary
from shards.synth.products import CLASS_NAMES
from shards.synth.samples import list_base_images


log = logging.getLogger(__name__)

INFO_FILE = "synth_info.json"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")


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
    _check_args(layout, normal, abnormal, size, views)
    base = list_base_images(base_images) if base_images is not None else None
    names = _class_list(classes, layout, base, base_images)
    if base is not None and len(base) < normal:
        log.warning("synth: %s holds %d images, fewer than --normal %d; using all of them as normal images",
                    base_images, len(base), normal)
        normal = len(base)
    per_class = (normal + abnormal) * (views if layout == "realiad" else 1)
    sink = Sink(out)
    start = time.perf_counter()
    with tqdm(total=per_class * len(names), disable=not progress, unit="img", desc=f"synth {layout}") as bar:
        run = Run(layout, sink, names, normal, abnormal, size, views, seed, base, bar)
        WRITERS[layout](run)
    info = _info(layout, names, normal, abnormal, size, views, seed, base_images)
    sink.write(INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    summary = run.summary
    summary.bytes = sink.bytes
    summary.seconds = time.perf_counter() - start
    log.info("synth: wrote %d images of %d classes (%s layout) to %s", summary.images, len(names), layout, summary.out)
    return summary


def _check_args(layout: str, normal: int, abnormal: int, size: int, views: int) -> None:
    if layout not in SYNTH_LAYOUTS:
        raise UserError(f"synth: unknown layout {layout!r}; valid layouts: {', '.join(SYNTH_LAYOUTS)}")
    for key, value, lo, hi in (("normal", normal, 1, None), ("abnormal", abnormal, 0, None),
                               ("size", size, 32, 4096), ("views", views, 1, 5)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise UserError(f"synth: --{key} must be an integer {bound} (got {value!r})")


def _info(layout: str, names: list[str], normal: int, abnormal: int, size: int, views: int, seed: int,
          base_images: str | Path | None) -> dict:
    """The contents of ``synth_info.json``: the data is synthetic, and how it was made."""
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
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``adpretrain synth``."""
    parser.add_argument("--layout", required=True, choices=SYNTH_LAYOUTS, help="on-disk layout of a public dataset")
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
                 views=s.views, seed=s.seed, progress=progress)
        if local:
            os.replace(out, spec.root)
        else:
            fs, path = storage.filesystem(spec.root)
            with storage.storage_errors(spec.root):
                fs.put(out.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_missing(sources: list[SourceSpec], progress: bool = False) -> list[str]:
    """Generate the synthetic data of every source that needs it; the names of those generated."""
    made = [s for s in sources if needs_generating(s)]
    for s in made:
        generate_source(s, progress)
    return [s.name for s in made]
