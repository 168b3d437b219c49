"""Helpers of the shard-building tests: their config, the stage as the CLI runs it, and
reading shards back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.config import load_config
from pipeline.stages import Context, shards as shards_stage
from shards import storage

REPO = Path(__file__).resolve().parents[1]
storage.register_webdataset_schemes()


def config(url: str, sources: list[dict], tmp: Path, **shards):
    return load_config(
        {
            "name": "shards-test",
            "sources": sources,
            "shards": {"url": url, "max_samples_per_shard": 5, **shards},
            "backbone": {"levels": [1], "weights": "random"},
            "train": {"steps": 1, "storage": str(tmp / "train")},
        }
    )


def build(cfg) -> dict:
    """The shards stage, as ``adpretrain build-shards`` runs it (without a progress bar)."""
    return shards_stage.run(cfg, Context())


def read_samples(urls: list[str]) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
