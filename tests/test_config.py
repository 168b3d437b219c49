"""The config schema: every shipped config validates, bad keys and values are named, overrides
apply, local paths become absolute, and the README's reference is the schema's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"local.yaml", "ci.yaml", "realiad_dinov2_base.yaml", "realiad_dinov2_large.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.sources_with("pretrain")
    assert cfg.backbone.weights != "random", "a shipped config must never use random weights"


def _base() -> dict:
    return yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())


def test_unknown_key_is_named():
    d = _base()
    d["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
        load_config(d)


def test_bad_value_names_key_and_allowed_values():
    d = _base()
    d["sources"][0]["layout"] = "imagenet"
    with pytest.raises(ConfigError) as e:
        load_config(d)
    msg = str(e.value)
    assert "sources.0.layout" in msg and "'realiad'" in msg and "imagenet" in msg


def test_missing_required_key():
    d = _base()
    del d["backbone"]["weights"]
    with pytest.raises(ConfigError, match=r"backbone\.weights: required key is missing"):
        load_config(d)


def test_cross_checks():
    d = _base()
    d["sources"][1]["name"] = d["sources"][0]["name"]
    with pytest.raises(ConfigError, match="duplicate source names"):
        load_config(d)
    d = _base()
    d["data"]["k_choices"] = [1, 64]
    with pytest.raises(ConfigError, match="exceed refbank.per_group"):
        load_config(d)
    d = _base()
    for s in d["sources"]:
        s["split"] = "eval"
    with pytest.raises(ConfigError, match="no source has split: pretrain"):
        load_config(d)
    d = _base()
    d["loss"] = {"angle_weight": 0, "norm_weight": 0}
    with pytest.raises(ConfigError, match="loss.angle_weight and loss.norm_weight are both 0"):
        load_config(d)
    d["loss"] = {"angle_weight": 0, "norm_weight": 0.5}
    assert load_config(d).loss.norm_weight == 0.5


def test_overrides_apply_and_validate(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_base()))
    cfg = load_config(p, ["train.steps=11", "sources.0.weight=2.5", "eval.methods=[padim]"])
    assert cfg.train.steps == 11 and cfg.sources[0].weight == 2.5 and cfg.eval.methods == ["padim"]
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(p, ["train.steps"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(p, ["sources.9.weight=1"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(p, ["train.steps=-1"])


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = _base()
    d["shards"]["url"] = "s3://bucket/shards"
    cfg = load_config(d)
    assert cfg.sources[0].root == str(tmp_path / "data/ci/realiad")
    assert cfg.shards.url == "s3://bucket/shards"
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert os.path.isabs(cfg.train.storage) and os.path.isabs(cfg.workdir)


def test_train_digest_ignores_operations_only():
    a = load_config(_base())
    assert load_config(_base() | {"eval": {"k_shot": 1}}).train_digest() == a.train_digest()
    d = _base()
    d["train"]["max_failures"] = 7
    assert load_config(d).train_digest() == a.train_digest()
    d["train"]["lr"] = 1e-3
    assert load_config(d).train_digest() != a.train_digest()


def test_readme_holds_the_generated_reference():
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "README's config reference is stale: paste `adpretrain config` output"


def test_cli_reports_config_errors_in_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    d = _base()
    d["data"]["abnormal_fraction"] = 1.5
    p.write_text(yaml.safe_dump(d))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "build-shards", str(p)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "data.abnormal_fraction" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "pretrain", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr
