"""MLflow layer against a real sqlite store and a real model registry (no mocks)."""

from __future__ import annotations

import json
import re
import logging
import os
from conftest import free_port
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from pipeline.config import TrackingSpec, load_config
from shards.errors import UserError
from pipeline.tracking import (
    RunTracker,
    Retry,
    ensure_store,
    load_registered,
    resolve_uri,
    select_champion,
)

BASE = {
    "name": "trk",
    "sources": [{"name": "a", "layout": "mvtec", "root": "/data/a", "split": "pretrain"}],
    "shards": {"url": "/tmp/shards"},
    "backbone": {"name": "tf_efficientnet_lite0", "levels": [2, 3], "weights": "random", "image_size": 64},
    "train": {"steps": 10, "storage": "/tmp/storage"},
}


def config(**train):
    data = json.loads(json.dumps(BASE))
    data["train"].update(train)
    return load_config(data)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    ensure_store(TrackingSpec(uri=uri))
    return uri


@pytest.fixture()
def spec(store_uri: str, request) -> TrackingSpec:
    """A fresh experiment and registered-model name in the module's database."""
    s = TrackingSpec(uri=store_uri, experiment=f"exp-{request.node.name}", model_name=f"adp-{request.node.name}",
                     system_metrics=False)
    ensure_store(s)
    return s


def client(spec: TrackingSpec) -> MlflowClient:
    return MlflowClient(spec.uri, registry_uri=spec.uri)


def test_ensure_store_concurrent_creation(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = TrackingSpec(uri="sqlite:///sub/dir/mlflow.db", experiment="exp", system_metrics=False)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            ensure_store(spec)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    uri = resolve_uri(spec.uri)
    assert uri == f"sqlite:///{tmp_path}/sub/dir/mlflow.db"
    exps = [e for e in MlflowClient(uri).search_experiments() if e.name == "exp"]
    assert len(exps) == 1
    # artifacts live beside the database, not in whatever directory a process runs in
    assert str(tmp_path / "sub" / "dir" / "mlartifacts") in exps[0].artifact_location
    ensure_store(spec)  # idempotent


def test_run_create_params_resume(spec: TrackingSpec, tmp_path: Path):
    long_name = "w" * 7000
    cfg = config()
    cfg = cfg.model_copy(update={"workdir": long_name})
    tags = {"git_commit": "abc123", "world_size": "2"}
    with pytest.raises(RuntimeError, match="boom"):
        with RunTracker.start(spec, cfg, run_name="r1", tags=tags) as tr:
            first = tr.run_id
            raise RuntimeError("boom")
    c = client(spec)
    run = c.get_run(first)
    assert run.info.status == "FAILED"
    assert run.data.tags["git_commit"] == "abc123"
    assert run.data.tags["adpretrain.run_name"] == "r1"
    params = run.data.params
    flat = cfg.flat()
    assert set(params) == set(flat)
    assert params["train.steps"] == "10"
    assert len(params["workdir"]) == 6000 and params["workdir"].endswith("[truncated]")
    local = c.download_artifacts(first, "config.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["workdir"] == long_name  # the whole config is kept

    # the same run name resumes the unfinished run; a changed value is reported, not overwritten
    changed = config(steps=20).model_copy(update={"workdir": long_name})
    tr = RunTracker.start(spec, changed, run_name="r1", tags=tags)
    assert tr.run_id == first
    run = c.get_run(first)
    assert run.info.status == "RUNNING"
    assert run.data.tags["adpretrain.resumes"] == "1"
    assert run.data.tags["adpretrain.resume.changed_params"] == "train.steps"
    assert run.data.params["train.steps"] == "10"
    tr.end("FINISHED")
    assert c.get_run(first).info.status == "FINISHED"

    # a finished run is never resumed; another name never matches
    again = RunTracker.start(spec, cfg, run_name="r1", tags=tags)
    other = RunTracker.start(spec, cfg, run_name="r2", tags=tags)
    assert len({first, again.run_id, other.run_id}) == 3
    parent_child = RunTracker.start(spec, cfg, run_name="r3", tags={}, parent_run_id=again.run_id)
    assert c.get_run(parent_child.run_id).data.tags["mlflow.parentRunId"] == again.run_id
    for t in (again, other, parent_child):
        t.end()


def test_metrics_are_buffered_and_batched(spec: TrackingSpec):
    tr = RunTracker.start(spec, config(), run_name="m", tags={}, flush_every=5, flush_seconds=1e9)
    worker = RunTracker.attach(spec, tr.run_id, flush_every=5, flush_seconds=1e9)
    c = client(spec)
    for step in range(1, 4):
        worker.log_metrics({"loss": 1.0 / step, "lr": 1e-4}, step=step)
    time.sleep(0.3)
    assert c.get_metric_history(tr.run_id, "loss") == []  # below flush_every: still buffered
    for step in range(4, 13):
        worker.log_metrics({"loss": 1.0 / step, "lr": 1e-4}, step=step)
    assert worker.flush(timeout=60)
    hist = sorted((m.step, m.value) for m in c.get_metric_history(tr.run_id, "loss"))
    assert hist == [(s, pytest.approx(1.0 / s)) for s in range(1, 13)]
    assert len(c.get_metric_history(tr.run_id, "lr")) == 12
    assert worker.dropped == 0
    with pytest.raises(UserError, match="not found"):
        RunTracker.attach(spec, "0" * 32)
    tr.end()


def test_close_lets_go_of_an_attached_handle_and_leaves_the_run_running(spec: TrackingSpec):
    """An attached handle's close writes what it holds, stops its writer thread and removes its
    spool folder, and the run stays RUNNING for its owner, whose end removes its own spool."""
    tr = RunTracker.start(spec, config(), run_name="close", tags={}, flush_every=100, flush_seconds=1e9)
    worker = RunTracker.attach(spec, tr.run_id, flush_every=100, flush_seconds=1e9)
    worker.log_metrics({"loss": 0.5}, step=1)
    assert os.path.isdir(worker._spool) and worker._writer._thread.is_alive()
    worker.close(timeout=60)
    c = client(spec)
    assert [m.value for m in c.get_metric_history(tr.run_id, "loss")] == [0.5]
    assert not os.path.exists(worker._spool) and not worker._writer._thread.is_alive()
    assert c.get_run(tr.run_id).info.status == "RUNNING"
    tr.end()
    assert not os.path.exists(tr._spool) and c.get_run(tr.run_id).info.status == "FINISHED"


def test_locked_database_is_retried_without_blocking_training(spec: TrackingSpec, caplog):
    """A writer holding the database longer than sqlite's busy timeout (20 s in MLflow) makes a
    write fail with 'database is locked': it is retried, training calls never wait or raise."""
    tr = RunTracker.start(spec, config(), run_name="lock", tags={}, flush_every=1,
                          retry=Retry(attempts=4, base_s=0.2))
    db = spec.uri[len("sqlite:///"):]
    holder = sqlite3.connect(db, isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    try:
        t0 = time.monotonic()
        for step in range(1, 6):
            tr.log_metrics({"loss": float(step)}, step=step)
            tr.log_metrics({"aux": float(step)}, step=step)
        assert time.monotonic() - t0 < 2.0  # the training thread did not wait for the store
        time.sleep(22)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert tr.flush(timeout=120)
    assert "database is locked" in caplog.text and "retry" in caplog.text
    assert tr.dropped == 0
    c = client(spec)
    assert sorted(m.step for m in c.get_metric_history(tr.run_id, "loss")) == [1, 2, 3, 4, 5]
    assert len(c.get_metric_history(tr.run_id, "aux")) == 5
    tr.end()


def test_unreachable_server_is_a_user_error(monkeypatch, caplog):
    port = free_port()
    http = TrackingSpec(uri=f"http://127.0.0.1:{port}", system_metrics=False)
    with pytest.raises(UserError, match=rf"MLflow tracking server at http://127.0.0.1:{port} unreachable"):
        ensure_store(http)
    with pytest.raises(UserError, match="unreachable"):
        RunTracker.start(http, config(), run_name="x", tags={})
    with pytest.raises(UserError, match="unsupported tracking store"):
        ensure_store(TrackingSpec(uri="ftp://somewhere"))

    # a server that goes away during the run: writes are retried, then dropped with a warning
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    tr = RunTracker(http, run_id="f" * 32, experiment_id="0", flush_every=1, retry=Retry(attempts=2, base_s=0.05))
    tr.log_metrics({"loss": 1.0}, step=1)
    assert tr.flush(timeout=60)
    assert tr.dropped == 1
    assert "dropped after retries" in caplog.text and "training continues" in caplog.text
    tr.end("FINISHED", timeout=60)  # ending against a dead server warns, never raises


def test_checkpoints_and_system_metrics(spec: TrackingSpec, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    on = spec.model_copy(update={"system_metrics": True})
    tr = RunTracker.start(on, config(), run_name="ck", tags={})
    files = {}
    for step in (100, 200):
        f = tmp_path / f"p{step}" / "projector.safetensors"
        f.parent.mkdir()
        save_file({"w": torch.full((3, 4), float(step))}, str(f))
        files[step] = f.read_bytes()
        tr.log_checkpoint(step, f"s3://bucket/runs/ck/checkpoint_{step}", str(f))
        f.unlink()  # the caller may delete its checkpoint folder right away
    time.sleep(1.5)
    tr.end()
    c = client(spec)
    run = c.get_run(tr.run_id)
    assert run.data.tags["adpretrain.checkpoint.latest"] == "s3://bucket/runs/ck/checkpoint_200"
    assert run.data.tags["adpretrain.checkpoint.latest_step"] == "200"
    assert [m.step for m in c.get_metric_history(tr.run_id, "checkpoint/step")] == [100, 200]
    assert [a.path for a in c.list_artifacts(tr.run_id, "checkpoints")] == [
        "checkpoints/step-0000100", "checkpoints/step-0000200"]
    for step, data in files.items():
        d = c.download_artifacts(tr.run_id, f"checkpoints/step-{step:07d}", str(tmp_path / "dl"))
        assert (Path(d) / "projector.safetensors").read_bytes() == data
        meta = json.loads((Path(d) / "checkpoint.json").read_text())
        assert meta == {"step": step, "storage_uri": f"s3://bucket/runs/ck/checkpoint_{step}",
                        "projector": "projector.safetensors"}
    assert any(k.startswith("system/driver/cpu_utilization") for k in run.data.metrics), run.data.metrics
    assert run.info.status == "FINISHED"


def tiny_export(folder: Path, seed: int) -> Path:
    """A folder in the export layout (weights + spec), for registry bookkeeping."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 4, generator=g)}, str(folder / "projector.safetensors"))
    save_file({"level0": torch.randn(4, generator=g)}, str(folder / "centers.safetensors"))
    (folder / "spec.json").write_text(json.dumps({"format": 1, "seed": seed}))
    return folder


def test_register_and_champion_selection(spec: TrackingSpec, tmp_path: Path):
    c = client(spec)
    cfg = config()
    versions = {}
    for i, value in ((1, 0.80), (2, 0.70), (3, 0.90)):
        tr = RunTracker.start(spec, cfg, run_name=f"model{i}", tags={})
        export = tiny_export(tmp_path / f"export{i}", seed=i)
        versions[i] = tr.log_model(str(export), spec.model_name, tags={"data.manifest_sha256": f"sha{i}"})
        tr.end()
        mv = c.get_model_version(spec.model_name, versions[i])
        assert mv.run_id == tr.run_id
        assert mv.tags["adpretrain.run_id"] == tr.run_id and mv.tags["data.manifest_sha256"] == f"sha{i}"
        assert c.get_run(tr.run_id).data.tags["adpretrain.registered_model"] == f"{spec.model_name}/{versions[i]}"
    assert [versions[i] for i in (1, 2, 3)] == ["1", "2", "3"]
    # before any selection there is no champion: the error lists the versions and names the other ways in
    model = re.escape(spec.model_name)
    with pytest.raises(UserError, match=rf"{model} has versions 1, 2, 3 \(a run whose version .* use "
                                        rf"models:/{model}@challenger or models:/{model}/N\)$"):
        load_registered(f"models:/{spec.model_name}@champion", tracking_uri=spec.uri)

    first = select_champion(spec, "1", "patchcore/pretrained/image_auroc", 0.80)
    assert first == {"decision": "champion", "new_value": 0.80, "champion_value": None, "version": "1",
                     "previous_champion": None, "gate_failed": []}
    worse = select_champion(spec, "2", "patchcore/pretrained/image_auroc", 0.70)
    assert worse["decision"] == "challenger" and worse["champion_value"] == pytest.approx(0.80)
    assert str(c.get_model_version_by_alias(spec.model_name, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(spec.model_name, "challenger").version) == "2"
    better = select_champion(spec, "3", "patchcore/pretrained/image_auroc", 0.90)
    assert better["decision"] == "champion" and better["previous_champion"] == "1"
    assert str(c.get_model_version_by_alias(spec.model_name, "champion").version) == "3"
    mv3 = c.get_model_version(spec.model_name, "3")
    assert float(mv3.tags["adpretrain.val.patchcore/pretrained/image_auroc"]) == pytest.approx(0.90)
    run3 = c.get_run(mv3.run_id)
    assert run3.data.metrics["val/patchcore/pretrained/image_auroc"] == pytest.approx(0.90)
    assert run3.data.metrics["val/patchcore/pretrained/image_auroc/champion"] == pytest.approx(0.80)

    # the champion downloads as the exported folder, byte for byte
    cache = tmp_path / "cache"
    folder = load_registered(f"models:/{spec.model_name}/3", tracking_uri=spec.uri, cache_dir=str(cache))
    for name in ("projector.safetensors", "centers.safetensors", "spec.json"):
        assert (Path(folder) / name).read_bytes() == (tmp_path / "export3" / name).read_bytes()
    assert load_registered(f"models:/{spec.model_name}/3", tracking_uri=spec.uri, cache_dir=str(cache)) == folder
    by_alias = load_registered(f"models:/{spec.model_name}@challenger", tracking_uri=spec.uri, cache_dir=str(cache))
    assert json.loads((Path(by_alias) / "spec.json").read_text())["seed"] == 2
    with pytest.raises(UserError, match=rf"not found in the registry.*; {model} has versions 1, "
                                        r"2 @challenger, 3 @champion$"):
        load_registered(f"models:/{spec.model_name}@nobody", tracking_uri=spec.uri, cache_dir=str(cache))
    with pytest.raises(UserError, match=rf"version=7\) not found; {model} has versions 1, 2"):
        load_registered(f"models:/{spec.model_name}/7", tracking_uri=spec.uri, cache_dir=str(cache))
    with pytest.raises(UserError, match="not an exported projector"):
        RunTracker.attach(spec, mv3.run_id).log_model(str(tmp_path), spec.model_name, tags={})

    # lower is better (e.g. a loss): the champion's value for this metric is compared from below
    select_champion(spec, "3", "val_loss", 0.5, higher_is_better=False)
    assert select_champion(spec, "1", "val_loss", 0.6, higher_is_better=False)["decision"] == "challenger"
    assert select_champion(spec, "1", "val_loss", 0.4, higher_is_better=False)["decision"] == "champion"
    with pytest.raises(UserError, match="cannot rank"):
        select_champion(spec, "1", "x", float("nan"))


def test_registered_model_loads_as_feature_extractor(spec: TrackingSpec, tmp_path: Path, monkeypatch):
    """A real export (random tiny backbone, projector) logged, registered, promoted, then loaded
    through models:/NAME@champion: pyfunc predict equals the feature extractor on the folder."""
    from pipeline.backbone import build_backbone
    from pipeline.export import load_feature_extractor, save_export
    from pipeline.projector import Projector

    cfg = config()
    cfg = cfg.model_copy(update={"projector": cfg.projector.model_copy(update={"memory_size": 8, "heads": 2})})
    backbone = build_backbone(cfg.backbone)
    projector = Projector.from_spec(list(backbone.widths), cfg.projector)
    centers = [torch.zeros(w) for w in backbone.widths]
    export = save_export(str(tmp_path / "export"), projector.state_dict(), centers, backbone, cfg.backbone,
                         cfg.projector, {"run": "test"})
    with RunTracker.start(spec, cfg, run_name="real", tags={}) as tr:
        version = tr.log_model(export, spec.model_name, tags={})
    assert select_champion(spec, version, "image_auroc", 0.5)["decision"] == "champion"

    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", spec.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", spec.uri)
    model = mlflow.pyfunc.load_model(f"models:/{spec.model_name}@champion")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g)
    refs = torch.rand(3, 3, 64, 64, generator=g)
    out = model.predict({"images": images.numpy(), "refs": refs.numpy()})
    want = load_feature_extractor(export).features(images, refs)
    assert sorted(out) == [f"level_{i}" for i in range(len(want))]
    for i, w in enumerate(want):
        np.testing.assert_allclose(out[f"level_{i}"], w.numpy(), rtol=1e-5, atol=1e-6)
    folder = load_registered(f"models:/{spec.model_name}@champion", cache_dir=str(tmp_path / "cache"))
    assert load_feature_extractor(folder).spec == load_feature_extractor(export).spec
