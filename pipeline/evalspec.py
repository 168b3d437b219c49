"""The settings of the evaluation jobs and of model selection (the ``eval:`` section).

Model selection reads ``eval.selection_metric`` = ``METHOD[+METHOD...]/KIND/METRIC``: the
mean over the classes of the ``split: val`` sources of METRIC on KIND features, averaged over
the METHODs (by default every evaluated method, pretrained features, image AUROC).
``eval.gate`` is the no-regression gate: a version becomes champion only if, for every
selection method, its KIND features beat each feature kind named in the gate by more than the
margin given there (by default every other evaluated kind, margin 0; see
:mod:`pipeline.evaluate.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from shards.spec import Strict

METHODS = ("featurenorm", "patchcore", "padim")
KINDS = ("raw", "residual", "pretrained")
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
METRICS = IMAGE_METRICS + PIXEL_METRICS


@dataclass(frozen=True)
class Selection:
    """``eval.selection_metric`` parsed: the methods averaged, the feature kind, the metric."""

    methods: tuple[str, ...]
    kind: str
    metric: str

    @property
    def key(self) -> str:
        """The metric's name as an MLflow key (tags and metrics take no ``+``)."""
        return f"{'_'.join(self.methods)}/{self.kind}/{self.metric}"


def parse_selection(text: str) -> Selection:
    """``METHOD[+METHOD...]/KIND/METRIC`` -> :class:`Selection` (ValueError when malformed)."""
    parts = text.split("/")
    methods = tuple(parts[0].split("+")) if parts else ()
    if len(parts) != 3 or not all(methods) or len(set(methods)) != len(methods):
        raise ValueError(f"eval.selection_metric {text!r} must be METHOD[+METHOD...]/KIND/METRIC, "
                         "e.g. featurenorm+patchcore+padim/pretrained/image_auroc")
    return Selection(methods, parts[1], parts[2])


class EvalSpec(Strict):
    k_shot: Literal[1, 2, 4, 8] = 8
    methods: list[Literal[METHODS]] = list(METHODS)
    kinds: list[Literal[KINDS]] = list(KINDS)
    selection_metric: str | None = Field(
        None,
        description="METHOD[+METHOD...]/KIND/METRIC: METRIC on KIND features, mean over the val classes, "
        "averaged over the METHODs; None: every method of eval.methods on pretrained features, image_auroc",
    )
    gate: dict[Literal[KINDS], float] | None = Field(
        None,
        description="no-regression gate, kind -> margin: a version becomes champion only if, on the val sources "
        "and for every selection method, the selection's KIND beats each kind named here by more than its margin; "
        "otherwise challenger. None: every other kind of eval.kinds, margin 0; {} turns the gate off",
    )
    coreset_ratio: float = Field(0.1, gt=0, le=1)
    padim_channels: int = Field(100, ge=1)
    max_test_images: int | None = Field(None, ge=1, description="cap per class (None: all)")
    out: str = Field("eval", description="results folder (under the run folder)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where features are extracted and methods run; auto: CUDA when present (Ray: when "
        "the cluster has GPUs); cuda: an error when this machine has none. PatchCore's nearest-neighbour search, "
        "decoding and metrics stay on the CPU"
    )
    gpus_per_task: float = Field(0.25, gt=0, le=1, description="fraction of a GPU each Ray feature or method "
                                 "task asks for when on CUDA")

    @property
    def selection(self) -> Selection | None:
        """The selection metric; None when it is left to its default and pretrained features are
        not evaluated (nothing to select)."""
        if self.selection_metric is not None:
            return parse_selection(self.selection_metric)
        return Selection(tuple(self.methods), "pretrained", "image_auroc") if "pretrained" in self.kinds else None

    @property
    def gate_margins(self) -> dict[str, float]:
        """The gate's kinds and margins (the selection's own kind is never compared with itself)."""
        s = self.selection
        gate = {k: 0.0 for k in self.kinds} if self.gate is None else self.gate
        return {k: m for k, m in gate.items() if s is None or k != s.kind}

    @model_validator(mode="after")
    def _selection(self) -> "EvalSpec":
        s = self.selection
        if s is not None and (any(m not in self.methods for m in s.methods) or s.kind not in self.kinds
                              or s.metric not in METRICS):
            raise ValueError(
                f"eval.selection_metric {self.selection_metric!r}: every METHOD must be in eval.methods "
                f"{list(self.methods)}, KIND in eval.kinds {list(self.kinds)} and METRIC one of {', '.join(METRICS)}"
            )
        missing = [k for k in self.gate_margins if k not in self.kinds]
        if missing:
            raise ValueError(f"eval.gate compares with {missing}, which eval.kinds {list(self.kinds)} does not "
                             "evaluate: add them to eval.kinds or remove them from eval.gate")
        return self
