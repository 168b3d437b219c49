"""The settings of the evaluation jobs and of model selection (the ``eval:`` section).

Model selection reads ``eval.selection_metric`` = ``METHOD[+METHOD...]/KIND/METRIC``: the
mean over the classes of the ``split: val`` sources of METRIC on KIND features, averaged over
the METHODs (by default the evaluated training-free methods, pretrained features, image AUROC).
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

METHODS = ("featurenorm", "patchcore", "padim", "cflow", "uniad", "glass")
TRAINING_FREE = ("featurenorm", "patchcore", "padim")
"""The methods fitted without training: evaluated and selected on by default."""
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


class CFlowSpec(Strict):
    """CFLOW's budget and model (pipeline/evaluate/cflow.py); defaults: the paper's (GPU-sized)."""

    blocks: int = Field(8, ge=1, description="coupling blocks per level")
    clamp: float = Field(1.9, gt=0)
    cond_dim: int = Field(128, ge=4, multiple_of=4, description="positional-encoding width")
    epochs: int = Field(200, ge=1)
    batch: int = Field(256, ge=1, description="patches per step")
    lr: float = Field(2e-4, gt=0)


class UniADSpec(Strict):
    """UniAD's budget and model (pipeline/evaluate/uniad.py); defaults: the paper's (GPU-sized)."""

    hidden: int = Field(256, ge=1)
    heads: int = Field(8, ge=1)
    enc_layers: int = Field(4, ge=1)
    dec_layers: int = Field(4, ge=1)
    ff: int = Field(1024, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    neighbour: int = Field(7, ge=1, description="side of the masked neighbourhood, in grid cells (odd)")
    jitter_scale: float = Field(20.0, gt=0)
    jitter_prob: float = Field(1.0, ge=0, le=1)
    epochs: int = Field(1000, ge=1)
    batch: int = Field(8, ge=1, description="images per step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    clip: float = Field(0.1, gt=0)


class GlassSpec(Strict):
    """GLASS's budget and model (pipeline/evaluate/glass.py); defaults: the paper's (GPU-sized)."""

    hidden: int = Field(1024, ge=1)
    layers: int = Field(2, ge=1)
    noise: float = Field(0.015, gt=0)
    steps: int = Field(20, ge=1, description="gradient-ascent steps per synthesis")
    step_size: float = Field(0.001, gt=0)
    project_every: int = Field(5, ge=1)
    r1: float = Field(0.5, gt=0)
    r2: float = Field(1.0, gt=0)
    epochs: int = Field(640, ge=1)
    batch: int = Field(8, ge=1, description="images per step")
    lr: float = Field(1e-4, gt=0)


class EvalSpec(Strict):
    k_shot: Literal[1, 2, 4, 8] = 8
    methods: list[Literal[METHODS]] = Field(list(TRAINING_FREE), description="methods evaluated")
    kinds: list[Literal[KINDS]] = list(KINDS)
    selection_metric: str | None = Field(
        None,
        description="METHOD[+METHOD...]/KIND/METRIC: METRIC on KIND features, mean over the val classes, "
        "averaged over the METHODs; None: the training-free methods of eval.methods (FeatureNorm, PatchCore, "
        "PaDiM; all of eval.methods when it has none of them) on pretrained features, image_auroc",
    )
    gate: dict[Literal[KINDS], float] | None = Field(
        None,
        description="no-regression gate, kind -> margin: a version becomes champion only if, on the val sources "
        "and for every selection method, the selection's KIND beats each kind named here by more than its margin; "
        "otherwise challenger. None: every other kind of eval.kinds, margin 0; {} turns the gate off",
    )
    coreset_ratio: float = Field(0.1, gt=0, le=1)
    padim_channels: int = Field(100, ge=1)
    padim_epsilon: float = Field(0.01, gt=0, description="PaDiM's covariance regularisation: + epsilon v I")
    padim_epsilon_scale: Literal["variance", "unit"] = Field(
        "variance", description="v: the mean variance of the position's features (scale-free), or 1 (the original)")
    cflow: CFlowSpec = CFlowSpec()
    uniad: UniADSpec = UniADSpec()
    glass: GlassSpec = GlassSpec()
    max_test_images: int | None = Field(None, ge=1, description="cap per class (None: all)")
    max_fit_images: int | None = Field(None, ge=1, description="cap per class of the normal training images "
                                       "the methods are fitted on, besides the k_shot references (None: all)")
    out: str = Field("eval", description="results folder (under the run folder)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where features are extracted and methods run; auto: CUDA when present (Ray: when "
        "the cluster has GPUs); cuda: an error when this machine has none. PatchCore's nearest-neighbour search, "
        "decoding and metrics stay on the CPU"
    )
    gpus_per_task: float = Field(0.25, gt=0, le=1, description="fraction of a GPU each Ray feature or method "
                                 "task asks for when on CUDA")
    curve: bool = Field(False, description="`adpretrain run` also draws the validation curve (`adpretrain curve`): "
                        "every training checkpoint evaluated on the val sources with the selection's methods")

    @property
    def selection(self) -> Selection | None:
        """The selection metric; None when it is left to its default and pretrained features are
        not evaluated (nothing to select)."""
        if self.selection_metric is not None:
            return parse_selection(self.selection_metric)
        methods = tuple(m for m in self.methods if m in TRAINING_FREE) or tuple(self.methods)
        return Selection(methods, "pretrained", "image_auroc") if "pretrained" in self.kinds else None

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
        if self.glass.r1 >= self.glass.r2:
            raise ValueError(f"eval.glass: r1 ({self.glass.r1}) must be below r2 ({self.glass.r2})")
        if self.uniad.neighbour % 2 == 0 or self.uniad.hidden % self.uniad.heads:
            raise ValueError(f"eval.uniad: neighbour must be odd (got {self.uniad.neighbour}) and hidden a multiple "
                             f"of heads (got {self.uniad.hidden} and {self.uniad.heads})")
        missing = [k for k in self.gate_margins if k not in self.kinds]
        if missing:
            raise ValueError(f"eval.gate compares with {missing}, which eval.kinds {list(self.kinds)} does not "
                             "evaluate: add them to eval.kinds or remove them from eval.gate")
        return self
