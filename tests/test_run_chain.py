"""End to end: `adpretrain run configs/ci.yaml` as a user runs it, every stage for real
(synthetic data, shards, reference bank, centers, 2-worker Ray Train + DeepSpeed, evaluation
jobs, MLflow registry, report), then a rerun that skips the stages whose outputs exist."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.profiling import PHASES

ROOT = Path(__file__).resolve().parents[1]


def _adpretrain(*args: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    exe = Path(sys.executable).with_name("adpretrain")
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_run_chain_ci_config(tmp_path):
    from mlflow.tracking import MlflowClient

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    profile = ("train.profile.start=2", "train.profile.steps=3", "--profile")
    out = _adpretrain("run", "configs/ci.yaml", "ray.num_cpus=2", *profile, cwd=tmp_path, timeout=1500)
    assert out.returncode == 0, f"adpretrain run failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"

    summary = out.stdout
    for stage in ("data", "shards", "refbank", "centers", "pretrain", "evaluate", "report"):
        assert f"  {stage} " in summary, f"stage {stage} missing from the summary"
    assert "mvtec-synth-heldout" in summary and "| pretrained |" in summary
    assert "mlflow ui --backend-store-uri sqlite:///" in summary

    registered = json.loads((tmp_path / "runs/ci/export/registered.json").read_text())
    assert registered["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"  # the store the version is in
    report = tmp_path / "runs/ci/report/report.html"
    html = report.read_text()
    assert "pretrained vs residual vs raw" in html and "loss.png" in html and "maps/" in html
    assert "How sure: pretrained against the other kinds" in html and "% interval |" in html
    assert (tmp_path / "runs/ci/report/loss.png").stat().st_size > 1000

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("adpretrain-ci")
    runs = client.search_runs([exp.experiment_id])
    pre = [r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("ci-")
           and "mlflow.parentRunId" not in r.data.tags]
    assert len(pre) == 1 and pre[0].info.status == "FINISHED"
    assert math.isfinite(pre[0].data.metrics["loss"]) and pre[0].data.metrics["checkpoint/step"] == 6
    assert any(r.data.tags.get("mlflow.parentRunId") == pre[0].info.run_id for r in runs), "no evaluation child run"
    arts = [a.path for a in client.list_artifacts(pre[0].info.run_id, "report")]
    assert "report/report.html" in arts
    # the real loop's profile (rank 0, steps 3..5): every phase of the step took time; files and MLflow
    table = json.loads((tmp_path / "runs/ci/profile/phases.json").read_text())
    ms = {r["phase"]: r["ms_per_step"] for r in table["phases"]}
    assert table["steps"] == 3 and all(ms[p] > 0 for p in PHASES if p != "logging"), ms
    assert (tmp_path / "runs/ci/profile/trace.json").stat().st_size > 10_000
    assert {"profile/phases.md", "profile/ops.md", "profile/trace.json"} <= {
        a.path for a in client.list_artifacts(pre[0].info.run_id, "profile")}
    ops = {g["phase"]: [r["op"] for r in g["ops"]] for g in json.loads((tmp_path / "runs/ci/profile/ops.json").read_text())}
    assert any("conv" in op for op in ops["backbone"]), ops["backbone"]
    assert "_AngleRowsBackward" in ops["backward"] and "gloo:all_gather" in ops["losses (other threads)"], ops
    assert pre[0].data.metrics["profile/backbone_ms"] == pytest.approx(ms["backbone"])
    versions = client.search_model_versions("name='adpretrain-projector'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias("adpretrain-projector", "champion").version == versions[0].version

    # without the profile: the same training (train.profile is how the run is operated), skipped
    again = _adpretrain("run", "configs/ci.yaml", "ray.num_cpus=2", cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "skipped (roots exist)" in again.stdout
    assert "skipped (a registered export of this config exists)" in again.stdout
    assert "0 shards written" in again.stdout
    assert len(client.search_model_versions("name='adpretrain-projector'")) == 1
