"""Where a generate() call writes: files under the output root (a folder or an fsspec URL),
image encoding, the summary of what was written, and the state the layout writers share."""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from shards.errors import StorageError, UserError
from shards.synth.base import Piece
from shards.synth.samples import ClassSource, Item


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


class Sink:
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


def encode(img: np.ndarray, suffix: str) -> bytes:
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


@dataclass
class Options:
    """What one generate() call renders: the classes, counts, image size and effects."""

    names: list[str]
    normal: int
    abnormal: int
    size: int  # width
    height: int | None  # None: square
    views: int
    seed: int
    base: list[Piece] | None  # the pieces of the user's images; None: rendered classes
    family: str | None
    defects: tuple[str, ...] | None  # the chosen defect types; None: every type of each class
    camera: bool


class Run:
    """The state of one generate() call shared by the layout writers."""

    def __init__(self, layout: str, sink: Sink, opts: Options, bar: tqdm) -> None:
        self.layout, self.sink, self.opts, self.bar = layout, sink, opts, bar
        self.names, self.normal, self.abnormal = opts.names, opts.normal, opts.abnormal
        self.size, self.views, self.seed = opts.size, opts.views, opts.seed
        self.height = opts.height or opts.size
        self.summary = SynthSummary(layout, str(sink.root))

    def sources(self) -> Iterator[ClassSource]:
        o = self.opts
        for name in self.names:
            self.summary.classes[name] = {"normal": 0, "abnormal": 0}
            yield ClassSource(name, o.seed, o.abnormal, o.base, o.normal, height=o.height, family=o.family,
                              defects=o.defects, camera=o.camera)

    def image(self, cls: str, rel: str, item: Item, suffix: str) -> None:
        self.sink.write(rel, encode(item.image, suffix))
        self.summary.images += 1
        self.summary.classes[cls]["abnormal" if item.mask is not None else "normal"] += 1
        if item.mask is not None:
            self.summary.defects[item.defect] += 1
            self.summary.mask_areas.append((cls, item.defect, float(np.count_nonzero(item.mask)) / item.mask.size))
        self.bar.update(1)

    def mask(self, rel: str, mask: np.ndarray, suffix: str) -> None:
        self.sink.write(rel, encode(mask, suffix))
        self.summary.masks += 1

    def text(self, rel: str, text: str) -> None:
        self.sink.write(rel, text.encode())
