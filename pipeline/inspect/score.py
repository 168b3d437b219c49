"""Scoring images with a fitted state: the one code path of `inspect`, the served model and the
reference the ONNX graph is checked against.

An image's map is the method's anomaly map (METHOD.md section 6: bilinear upsampling to the image
size, Gaussian blur) on the projected residual features against the state's references; its score
is the map's maximum, and it is anomalous when the score is above the state's threshold.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.inspect.images import Input, load
from pipeline.inspect.state import InspectState, restore_method

BATCH = 16  # images per backbone batch


def batches(images: torch.Tensor, size: int = BATCH) -> Iterator[torch.Tensor]:
    for i in range(0, images.shape[0], size):
        yield images[i : i + size]


_PRECISION = threading.RLock()  # one setting at a time: a served model may score in several threads


@contextlib.contextmanager
def backbone_precision(fx, bf16: bool) -> Iterator[None]:
    """Run ``fx``'s backbone under bf16 autocast or not, whatever its spec says, restoring it after."""
    with _PRECISION:
        before = fx.backbone.bf16
        fx.backbone.bf16 = bool(bf16)
        try:
            yield
        finally:
            fx.backbone.bf16 = before


@dataclass
class Inspector:
    """A feature extractor and a fitted state: images -> anomaly maps and scores."""

    fx: object  # pipeline.export.ADFeatures
    state: InspectState
    method: object
    bank: list[torch.Tensor]  # the state's references on the extractor's device

    @classmethod
    def create(cls, fx, state: InspectState) -> "Inspector":
        bank = [b.to(fx.device) for b in state.bank]
        return cls(fx, state, restore_method(state, fx.device), bank)

    @torch.no_grad()
    def score(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) images in [0, 1] -> maps (B, S, S) and scores (B,), float32 on the CPU."""
        with backbone_precision(self.fx, self.state.bf16):
            feats = self.fx.features(images01, self.bank)
        maps, scores = self.method.predict(feats, self.state.image_size)
        return maps.float().cpu(), scores.float().cpu()

    def score_all(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.score(chunk) for chunk in batches(images01)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def decide(self, score: float) -> str:
        return "anomalous" if float(score) > self.state.threshold else "normal"


def _row(index: int, path: str, error: str | None) -> dict:
    return {"index": index, "path": path, "status": "unreadable" if error else "ok", "score": None,
            "decision": None, "overlay": None, "error": error}


def _overlay_name(index: int, path: str) -> str:
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
    return os.path.join("maps", f"{index:05d}_{safe}.png")


def _score_chunk(inspector: Inspector, rows: list[dict], images: list[torch.Tensor], out_dir: str | None) -> None:
    """Score the readable ``rows`` (``images`` in the same order) and draw their overlays."""
    from pipeline.inspect.overlay import draw_overlay

    maps, scores = inspector.score(torch.stack(images))
    st = inspector.state
    for row, img, amap, score in zip(rows, images, maps, scores):
        row["score"] = float(score)
        row["decision"] = inspector.decide(row["score"])
        if out_dir is not None:
            row["overlay"] = _overlay_name(row["index"], row["path"])
            draw_overlay(os.path.join(out_dir, row["overlay"]), img, amap, st.threshold, st.calibration["display"],
                         f"{row['score']:.4g} {'>' if row['decision'] == 'anomalous' else '<='} {st.threshold:.4g}"
                         f" {row['decision']}")


def inspect_inputs(inspector: Inspector, inputs: list[Input], out_dir: str | None,
                   progress: bool = True, batch: int = BATCH) -> list[dict]:
    """One row per input, in order: score and decision, or why it could not be read; with
    ``out_dir``, each scored image's overlay PNG under ``out_dir/maps/``."""
    from tqdm import tqdm

    size = inspector.state.image_size
    rows = []
    with tqdm(total=len(inputs), desc="inspect", unit="img", disable=not progress) as bar:
        for start in range(0, len(inputs), batch):
            ok_rows, ok_images = [], []
            for i, inp in enumerate(inputs[start : start + batch], start):
                t, err = (None, inp.error) if inp.error else load(inp.path, size)
                rows.append(_row(i, inp.path, err))
                if t is not None:
                    ok_rows.append(rows[-1])
                    ok_images.append(t)
            if ok_images:
                _score_chunk(inspector, ok_rows, ok_images, out_dir)
            bar.update(len(inputs[start : start + batch]))
    return rows
