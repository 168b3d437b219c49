"""No credential inside a URL reaches MLflow, the logs or an error message.

A run against a real MLflow server (sqlite store and artifact folder on this disk) whose
tracking URI, storage URLs and Ray address carry a password: the server's whole store is
searched for it afterwards. Errors of a server that refuses, of one that is not there, of the
CLI, and of object storage with credentials in the URL or in AWS_ENDPOINT_URL show ``***``.
"""

from __future__ import annotations

import base64
import http.server
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from pipeline.cli import main
from pipeline.config import TrackingSpec, load_config
from shards.errors import StorageError, UserError
from pipeline.tracking import Retry, RunTracker, ensure_store
from shards import storage
from shards.storage import mask_secrets
from conftest import free_port

SECRET = "Pa55-w0rd-n3ver-logged"
S3 = f"s3://AKIAEXAMPLE:{SECRET}@bucket"


def config(tracking_uri: str):
    return load_config({
        "name": "secrets",
        "sources": [{"name": "a", "layout": "mvtec", "root": f"{S3}/data", "split": "pretrain"}],
        "shards": {"url": f"{S3}/shards"},
        "backbone": {"levels": [1], "weights": "random"},
        "train": {"steps": 3, "storage": f"{S3}/checkpoints"},
        "tracking": {"uri": tracking_uri, "experiment": "secrets", "system_metrics": False},
        "ray": {"address": f"ray://alice:{SECRET}@head:10001"},
    })


def test_mask_secrets():
    assert mask_secrets("http://user:pass@host:5000/x") == "http://***@host:5000/x"
    assert mask_secrets(f"at '{S3}/k': s3://other:x/y+z@b2") == "at 's3://***@bucket/k': s3://***@b2"
    assert mask_secrets("sqlite:////tmp/mlflow.db http://host:5000") == "sqlite:////tmp/mlflow.db http://host:5000"
    assert mask_secrets(f'bad bucket "AKIAEXAMPLE:{SECRET}@bucket"', S3) == 'bad bucket "***@bucket"'


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with its sqlite store and artifacts in one folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    with open(root / "server.log", "wb") as out:
        proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/store/mlflow.db",
             "--artifacts-destination", str(root / "store" / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "mlflow server did not answer within 240 s"
            time.sleep(0.5)
        yield root / "store", port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_no_secret_reaches_the_store_or_the_logs(mlflow_server, tmp_path: Path, caplog, capsys):
    store, port = mlflow_server
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    cfg = config(uri)
    caplog.set_level(logging.DEBUG)
    ensure_store(cfg.tracking)
    tracker = RunTracker.start(cfg.tracking, cfg, run_name="secrets",
                               tags={"data.root": cfg.sources[0].root, "adpretrain.storage": cfg.train.storage})
    assert tracker.uri == uri  # the real URI connects
    tracker.log_metrics({"loss": 1.5}, step=1)
    weights = tmp_path / "projector.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(weights))
    tracker.log_checkpoint(1, f"{cfg.train.storage}/secrets/checkpoint_000001", str(weights))
    tracker.end()

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.metrics["loss"] == 1.5
    assert run.data.params["tracking.uri"] == f"http://***@127.0.0.1:{port}"
    assert run.data.params["shards.url"] == "s3://***@bucket/shards"
    assert run.data.params["ray.address"] == "ray://***@head:10001"
    assert run.data.tags["data.root"] == "s3://***@bucket/data"
    assert run.data.tags["adpretrain.storage"] == "s3://***@bucket/checkpoints"
    assert run.data.tags["adpretrain.checkpoint.latest"] == "s3://***@bucket/checkpoints/secrets/checkpoint_000001"
    configs = list(store.rglob("config.json"))
    assert len(configs) == 1 and '"url": "s3://***@bucket/shards"' in configs[0].read_text()
    assert list(store.rglob("checkpoint.json")), "the checkpoint record was not uploaded"

    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files)
    assert [str(p) for p in files if SECRET.encode() in p.read_bytes()] == []
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "created in http://***@127.0.0.1" in caplog.text
    assert SECRET not in caplog.text


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers /health; refuses every API call (403), recording the Authorization header."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/health":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
        else:
            body = b'{"error_code": "PERMISSION_DENIED", "message": "Permission denied"}'
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_credentials_are_sent_to_the_server_and_shown_masked():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
        with pytest.raises(UserError) as e:
            ensure_store(TrackingSpec(uri=uri, experiment="x", system_metrics=False))
    finally:
        server.shutdown()
    assert f"http://***@127.0.0.1:{port}" in str(e.value) and "Permission denied" in str(e.value)
    assert SECRET not in str(e.value)
    basic = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert [p for p, _ in Recorder.seen][:1] == ["/health"] and len(Recorder.seen) >= 2
    assert {a for _, a in Recorder.seen} == {basic}


def test_unreachable_server_shows_no_secret(tmp_path: Path, monkeypatch, caplog, capsys):
    port = free_port()
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    spec = TrackingSpec(uri=uri, system_metrics=False)
    for call in (lambda: ensure_store(spec), lambda: RunTracker.start(spec, config(uri), run_name="x", tags={})):
        unreachable = rf"MLflow tracking server at http://\*\*\*@127.0.0.1:{port} unreachable"
        with pytest.raises(UserError, match=unreachable) as e:
            call()
        assert SECRET not in str(e.value)

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(uri).to_dict()))
    assert main(["pretrain", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"http://***@127.0.0.1:{port} unreachable" in err and SECRET not in err
    assert main(["config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "url: s3://***@bucket/shards" in out and SECRET not in out

    # writes to a server that went away: retried, then dropped with a warning
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.DEBUG)
    tr = RunTracker(spec, run_id="f" * 32, experiment_id="0", flush_every=1, retry=Retry(attempts=2, base_s=0.05))
    tr.log_metrics({"loss": 1.0}, step=1)
    assert tr.flush(timeout=60)
    tr.end("FINISHED", timeout=60)
    assert "dropped after retries" in caplog.text
    assert SECRET not in caplog.text and SECRET not in "".join(capsys.readouterr())


def test_storage_errors_show_no_secret(monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://alice:{SECRET}@127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        for call in (lambda: storage.exists("s3://bucket/x"), lambda: storage.check_writable(f"{S3}/x")):
            with pytest.raises(StorageError) as e:
                call()
            assert SECRET not in str(e.value), str(e.value)
        assert "'s3://***@bucket/x" in str(e.value)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
