"""Fitting a product's state from its good images.

The good images are shuffled with the seed; the first K are the references (the K-shot bank).
FeatureNorm learns nothing, so every other good image calibrates the threshold. PatchCore and
PaDiM fit on part of the rest, and the other part (``calib_fraction`` of it, rounded up, never
used for fitting) calibrates. The threshold is the smallest one whose false-positive rate on the
calibration images is at most ``fpr`` (an image is anomalous when its score is above the
threshold): with the scores sorted from the highest, ``floor(fpr * n)`` may lie above it, so it is
the ``floor(fpr * n) + 1``-th highest score. At least ``ceil(1 / fpr)`` calibration images are
needed for that rate to mean anything.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from pipeline.inspect.images import find_images, load
from pipeline.inspect.score import Inspector, backbone_precision, batches
from pipeline.inspect.state import InspectState, method_tensors
from shards.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("featurenorm", "patchcore", "padim")
FITTED = ("patchcore", "padim")  # methods that learn from good images


@dataclass(frozen=True)
class GoodSplit:
    references: list[str]
    fit: list[str]
    calibration: list[str]


def needed_calibration(fpr: float) -> int:
    """Calibration images a false-positive rate of ``fpr`` needs: ceil(1 / fpr)."""
    return math.ceil(1.0 / fpr - 1e-9)


def _calibration_count(rest: int, method: str, fraction: float) -> int:
    return rest if method not in FITTED else math.ceil(fraction * rest - 1e-9)


def _good_needed(k: int, need: int, method: str, fraction: float) -> int:
    """The fewest good images that give ``need`` calibration images (and one to fit, when fitting)."""
    rest = need
    while _calibration_count(rest, method, fraction) < need or (
            method in FITTED and rest - _calibration_count(rest, method, fraction) < 1):
        rest += 1
    return k + rest


def split_good(files: list[str], k_shot: int, method: str, fpr: float, seed: int,
               calib_fraction: float = 0.5, where: str = "--good") -> GoodSplit:
    """The seeded references / fit / calibration split of the good images ``files``."""
    if not 0 < fpr < 1:
        raise UserError(f"--fpr {fpr}: the false-positive rate must lie strictly between 0 and 1 (e.g. 0.01)")
    if not 0 < calib_fraction < 1:
        raise UserError(f"--calib-fraction {calib_fraction}: must lie strictly between 0 and 1 (e.g. 0.5)")
    if k_shot < 1:
        raise UserError(f"--k-shot {k_shot}: at least one reference image is needed")
    need = needed_calibration(fpr)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [files[i] for i in order]
    refs, rest = shuffled[:k_shot], shuffled[k_shot:]
    n_cal = _calibration_count(len(rest), method, calib_fraction)
    n_fit = len(rest) - n_cal
    if len(refs) < k_shot or n_cal < need or (method in FITTED and n_fit < 1):
        total = _good_needed(k_shot, need, method, calib_fraction)
        fit_part = (f", then {method} fits on {1 - calib_fraction:.0%} of the rest and the other "
                    f"{calib_fraction:.0%} calibrates" if method in FITTED else ", the rest calibrates")
        raise UserError(
            f"{where}: {len(files)} good images are too few: --fpr {fpr} needs at least {need} calibration images "
            f"(ceil(1/fpr)), and {k_shot} are references (--k-shot){fit_part}: {total} good images are needed. "
            f"Add good images, or raise --fpr (with these images the lowest is "
            f"{_lowest_fpr(n_cal)}), or lower --k-shot"
        )
    cal, fit = rest[:n_cal], rest[n_cal:]
    return GoodSplit(sorted(refs), sorted(fit), sorted(cal))


def _lowest_fpr(n_cal: int) -> str:
    return f"{1.0 / n_cal:.4g}" if n_cal > 0 else "none: no image is left to calibrate"


def calibrate_threshold(scores: torch.Tensor, fpr: float) -> float:
    """The smallest threshold t with #{scores > t} / n <= fpr: the floor(fpr*n)+1-th highest score."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten().sort(descending=True).values
    allowed = math.floor(fpr * s.numel() + 1e-9)
    return float(s[min(allowed, s.numel() - 1)])


def _load_good(paths: list[str], size: int) -> torch.Tensor:
    out = []
    for p in paths:
        t, err = load(p, size)
        if t is None:
            raise UserError(f"good image {p} cannot be used ({err}); remove or replace it")
        out.append(t)
    return torch.stack(out)


def _features(fx, images: torch.Tensor, bank: list[torch.Tensor], bf16: bool) -> list[torch.Tensor]:
    parts = []
    with backbone_precision(fx, bf16):
        for chunk in batches(images):
            parts.append(fx.features(chunk, bank))
    return [torch.cat(level) for level in zip(*parts)]


@dataclass(frozen=True)
class FitSettings:
    method: str
    k_shot: int
    fpr: float
    seed: int = 0
    calib_fraction: float = 0.5
    bf16: bool = True


def plan_fit(good_dir: str, s: FitSettings) -> GoodSplit:
    """The split of the good images below ``good_dir`` (checked before any model is loaded)."""
    files = find_images(good_dir)
    return split_good(files, s.k_shot, s.method, s.fpr, s.seed, s.calib_fraction, where=f"--good {good_dir}")


def fit_state(fx, model: dict, split: GoodSplit, s: FitSettings) -> tuple[InspectState, Inspector]:
    """Fit a state from the good images of ``split``: references, method, threshold."""
    from pipeline.evaluate.methods import make_method
    from pipeline.config import EvalSpec

    size = fx.backbone.image_size
    with backbone_precision(fx, s.bf16):
        bank = fx.bank(_load_good(split.references, size).to(fx.device))
    method = make_method(s.method, EvalSpec(seed=s.seed))
    if s.method in FITTED:
        method.fit(_features(fx, _load_good(split.fit, size), bank, s.bf16))
    tensors, params = method_tensors(s.method, method)
    state = InspectState(
        method=s.method, threshold=float("nan"), fpr=s.fpr, k_shot=s.k_shot, seed=s.seed, image_size=size,
        bf16=s.bf16, model=model, bank=[b.cpu() for b in bank], tensors=tensors, params=params,
        counts={"references": len(split.references), "fit": len(split.fit), "calibration": len(split.calibration)},
        references=split.references,
    )
    inspector = Inspector(fx, state, method, bank)
    maps, scores = inspector.score_all(_load_good(split.calibration, size))
    state.threshold = calibrate_threshold(scores, s.fpr)
    lo = float(maps.min())
    state.calibration = {
        "fpr_reached": float((scores.double() > state.threshold).double().mean()),
        "score_min": float(scores.min()), "score_max": float(scores.max()),
        "display": [lo, state.threshold + max(state.threshold - lo, 1e-6)],
        "calib_fraction": s.calib_fraction if s.method in FITTED else 1.0,
    }
    log.info("inspect: %s fitted on %d images, threshold %.6g from %d calibration images", s.method,
             len(split.fit), state.threshold, len(split.calibration))
    return state, inspector
