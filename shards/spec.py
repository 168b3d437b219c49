"""What the shards floor is configured with: the sources, their synthetic data, and the shard set.

:mod:`pipeline.config` composes these models into the one ``Config``; they are validated the
same way (unknown keys and bad values fail, naming the key, the value and what is allowed).
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

LAYOUTS = ("realiad", "mvtec", "mpdd", "visa", "btad", "mvtec3d", "folder")
SPLITS = ("pretrain", "val", "eval")

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthSpec(Strict):
    """Generate synthetic data into the source's root when the root does not exist yet."""

    classes: Union[int, list[str], None] = Field(
        None, description="number of classes (the first N of the family, or of all), or class names (synth_*); "
        "default: the family's classes, or 4"
    )
    normal: int = Field(20, ge=1, description="normal images per class (per view in realiad)")
    abnormal: int = Field(10, ge=0, description="abnormal images per class")
    size: int = Field(256, ge=32, le=4096, description="image width in pixels (and height unless height is set)")
    height: int | None = Field(None, ge=32, le=4096, description="image height in pixels (default: size, square)")
    views: int = Field(5, ge=1, le=5, description="camera views (realiad layout only)")
    seed: int = 0
    family: Literal["pretrain", "val", "eval"] | None = Field(
        None, description="a family of classes and defect types, disjoint from the others (docs/synth.md)"
    )
    defects: list[str] | None = Field(
        None, description="defect types to paint (names from docs/synth.md), a subset of the family's; "
        "default: every type of the family (or of all)"
    )
    camera: bool = Field(True, description="camera effects on rendered classes: noise, vignetting, blur, perspective")
    base_images: str | None = Field(None, description="a local folder of your own normal images: the one class")
    base_mode: Literal["whole", "tile"] = Field("whole", description="base images used whole, or cut into tiles")
    tile: int | None = Field(None, ge=16, description="tile width in pixels of the base images (tile mode; default: size)")


class SourceSpec(Strict):
    name: str = Field(description="identifier used in shard paths and keys ([a-z0-9_-])")
    layout: Literal[LAYOUTS] = Field(description="on-disk layout of the dataset")
    root: str = Field(description="dataset root: local path or fsspec URL (s3://bucket/prefix)")
    split: Literal[SPLITS] = Field(description="pretrain, val (model selection) or eval (reported)")
    classes: Union[Literal["all"], list[str]] = Field("all", description="'all' or a list of class names")
    weight: float = Field(1.0, gt=0, description="sampling weight when mixing pretraining sources")
    masks: Literal["auto", "none"] = Field(
        "auto", description="'none' for image-level-only data: abnormal samples carry no mask"
    )
    synth: SynthSpec | None = Field(None, description="generate synthetic data here if root is missing")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", v):
            raise ValueError(f"{v!r} must match [a-z0-9][a-z0-9_-]* (used in paths and sample keys)")
        return v


class ShardsSpec(Strict):
    url: str = Field(description="where shards, manifest, reference bank and centers go (path or s3://)")
    max_samples_per_shard: int = Field(1000, ge=1)
    max_bytes_per_shard: int = Field(1_000_000_000, ge=1_000_000)
    max_quarantine_fraction: float = Field(
        0.05, ge=0, le=1, description="a source with more quarantined inputs fails the build"
    )
    tasks: int | None = Field(None, ge=1, description="Ray tasks at once (default: cluster CPUs)")
