"""The common interface of the evaluation methods and the factory the jobs use."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from pipeline.config import METHODS, EvalSpec
from pipeline.evaluate.cflow import CFlow
from pipeline.evaluate.featurenorm import FeatureNorm
from pipeline.evaluate.glass import GLASS
from pipeline.evaluate.padim import PaDiM
from pipeline.evaluate.patchcore import PatchCore
from pipeline.evaluate.uniad import UniAD
from shards.errors import UserError


@runtime_checkable
class Method(Protocol):
    """An anomaly-detection method over multi-level patch features.

    Features are a list over levels of (B, C_l, h, w) tensors on one h x w grid.
    """

    def fit(self, train_feats: list[Tensor]) -> "Method":
        """Learn from the features of the class's normal training images."""
        ...

    def predict(self, feats: list[Tensor], size: int) -> tuple[Tensor, Tensor]:
        """Anomaly maps (B, size, size) and image scores (B,) = max of each map."""
        ...


def make_method(name: str, spec: EvalSpec) -> Method:
    """A fresh, unfitted method configured from the eval section of the config."""
    if name == "featurenorm":
        return FeatureNorm()
    if name == "patchcore":
        return PatchCore(coreset_ratio=spec.coreset_ratio, seed=spec.seed)
    if name == "padim":
        return PaDiM(channels=spec.padim_channels, seed=spec.seed, epsilon=spec.padim_epsilon,
                     scale=spec.padim_epsilon_scale)
    learned = {"cflow": (CFlow, spec.cflow), "uniad": (UniAD, spec.uniad), "glass": (GLASS, spec.glass)}
    if name in learned:
        cls, budget = learned[name]
        return cls(**budget.model_dump(), seed=spec.seed)
    raise UserError(f"unknown evaluation method {name!r} (eval.methods): use one of {', '.join(METHODS)}")
