"""Where everything lies: every path and URL rule of the pipeline, written once.

The shard set's own layout (``manifest.json``, shard names) is :mod:`shards.manifest`'s;
this module places what the pipeline derives from it and what a run writes:

    shards.url/refbank/<backbone>-<digest>/      reference bank (digest of refbank_inputs)
    shards.url/centers/<backbone>-<digest>.safetensors   centers (digest of centers_inputs)
    train.storage/<run name>/                    Ray Train runs and checkpoints
    workdir/name/export/                         the exported projector of the last pretraining
    workdir/name/<eval.out>/                     evaluation tables, pictures and result files
    workdir/name/report/                         the HTML report of `adpretrain run`
    workdir/name/checkpoints/<run id>/step-N/    a training checkpoint: its export and its val
                                                 evaluations (val-<digest of their inputs>)
    workdir/name/curve/                          the validation curve over the checkpoints

The reference bank and the centers are keyed by what they are computed from (the sha256 of
the shard manifest and their own settings), so a changed input gives a new URL and nothing
stale is reused; the run name is keyed by the training settings and the centers' URL.
"""

from __future__ import annotations

import hashlib
import json
import os

from pipeline import levels
from pipeline.config import Config
from shards import storage
from shards.manifest import manifest_sha256


def refbank_inputs(cfg: Config, backbone_id: str) -> dict:
    """What the reference bank is computed from."""
    return {"format": levels.FORMAT, "manifest_sha256": manifest_sha256(cfg.shards.url),
            "backbone_id": backbone_id,
            "bf16": cfg.backbone.bf16, "per_group": cfg.refbank.per_group, "seed": cfg.refbank.seed}


def centers_inputs(cfg: Config, backbone_id: str) -> dict:
    """What the centers are computed from (the reference bank's inputs among them)."""
    return {"refbank": refbank_inputs(cfg, backbone_id), "k": cfg.centers.k,
            "max_images": cfg.centers.max_images, "seed": cfg.seed}


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def refbank_url(cfg: Config, backbone_id: str) -> str:
    return storage.join(cfg.shards.url, "refbank", f"{backbone_id}-{_digest(refbank_inputs(cfg, backbone_id))}")


def centers_url(cfg: Config, backbone_id: str) -> str:
    name = f"{backbone_id}-{_digest(centers_inputs(cfg, backbone_id))}.safetensors"
    return storage.join(cfg.shards.url, "centers", name)


def train_storage(cfg: Config) -> str:
    """Where Ray Train keeps this config's runs and checkpoints (``train.storage``), absolute."""
    url = cfg.train.storage
    return url if storage.is_remote(url) else os.path.abspath(url)


def run_dir(cfg: Config) -> str:
    """This config's run folder: ``workdir/name``."""
    return os.path.abspath(os.path.join(cfg.workdir, cfg.name))


def export_dir(cfg: Config) -> str:
    """The exported projector of this config's last pretraining."""
    return os.path.join(run_dir(cfg), "export")


def eval_dir(cfg: Config) -> str:
    """Evaluation outputs: tables, pictures, result files."""
    return os.path.join(run_dir(cfg), cfg.eval.out)


def profile_dir(cfg: Config) -> str:
    """The training profile (``train.profile``): trace and phase table."""
    return os.path.join(run_dir(cfg), "profile")


def report_dir(cfg: Config) -> str:
    return os.path.join(run_dir(cfg), "report")


def checkpoint_dir(cfg: Config, run_id: str, step: int) -> str:
    """The checkpoint at ``step`` of the MLflow training run ``run_id``: its export, its evaluations."""
    return os.path.join(run_dir(cfg), "checkpoints", run_id, f"step-{int(step):07d}")


def checkpoint_eval_dir(cfg: Config, run_id: str, step: int, inputs: dict) -> str:
    """An evaluation of a checkpoint, keyed by what it is computed from (``inputs``)."""
    return os.path.join(checkpoint_dir(cfg, run_id, step), f"val-{_digest(inputs)}")


def curve_dir(cfg: Config) -> str:
    """The validation curve of this config's last pretraining: ``curve.json``, ``curve.png``."""
    return os.path.join(run_dir(cfg), "curve")


def run_name(cfg: Config, centers_url: str) -> str:
    """One name for the Ray run and the MLflow run, from the training config and the data it
    trains on (the centers' URL is keyed by the shard manifest and the bank's and centers'
    settings): a rerun of the same training on the same data resumes both; changed settings
    or rebuilt shards start both afresh."""
    key = hashlib.sha256(f"{cfg.train_digest()}\n{centers_url}".encode()).hexdigest()[:10]
    return f"{cfg.name}-{key}"
