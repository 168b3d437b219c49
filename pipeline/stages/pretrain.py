"""The pretraining stage (METHOD.md §3-5), between the centers and evaluation.

Done when a finished, registered export of this very config, trained on these data, exists:
its ``spec.json`` names the run of today's training settings and centers
(:func:`pipeline.paths.run_name`) and its ``registered.json`` the model version. Otherwise
:func:`pipeline.launcher.pretrain` trains on Ray Train, exports and registers the projector.
``adpretrain pretrain`` calls the launcher itself and always trains.
"""

from __future__ import annotations

import json
import os

from pipeline.config import Config
from pipeline.export import REGISTERED_FILE, SPEC_FILE
from pipeline.launcher import PretrainResult, pretrain
from pipeline.paths import centers_url, export_dir, run_name
from pipeline.stages import Context

NAME = "pretrain"


def done(cfg: Config, ctx: Context) -> bool:
    """A finished, registered export of this very config, trained on these data, exists."""
    folder = export_dir(cfg)
    try:
        with open(os.path.join(folder, SPEC_FILE)) as f:
            spec = json.load(f)
        trained_on = run_name(cfg, centers_url(cfg, ctx.backbone(cfg.backbone).id))
        return os.path.isfile(os.path.join(folder, REGISTERED_FILE)) and \
            spec["provenance"].get("run_name") == trained_on
    except (OSError, KeyError, ValueError):
        return False


def run(cfg: Config, ctx: Context) -> PretrainResult | None:
    """Pretrain, export and register unless :func:`done`; None when skipped."""
    return None if done(cfg, ctx) else pretrain(cfg, ctx)


def summary(result: PretrainResult | None) -> str:
    return "skipped (a registered export of this config exists)" if result is None else \
        f"model version {result.model_version}"
