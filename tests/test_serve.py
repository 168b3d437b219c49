"""The registered champion served by a real `mlflow models serve` process: POSTed images (base64
PNG and JPEG bytes, or paths) with an inspect state as the `state` param give the scores and
decisions `adpretrain inspect` gives for the same images, through the same registry URI."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

pytest.register_assert_rewrite("inspect_fixtures")  # also the plugin below
from conftest import free_port  # noqa: E402
from inspect_fixtures import read_results, run_cli  # noqa: E402

pytest_plugins = ["inspect_fixtures"]

START_TIMEOUT = 240  # seconds for the server to load the model on a busy 2-core machine


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/ping", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"mlflow models serve did not answer /ping in {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in a session of its own), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(20)


def _invoke(url: str, column: str, values: list[str], state: Path) -> requests.Response:
    body = {"dataframe_split": {"columns": [column], "data": [[v] for v in values]}, "params": {"state": str(state)}}
    return requests.post(url + "/invocations", json=body, timeout=120)


def _inputs(inspect_data, tmp_path: Path) -> Path:
    """The test images plus one of them as a JPEG."""
    folder = tmp_path / "inputs"
    shutil.copytree(inspect_data.test, folder)
    with Image.open(inspect_data.test_images()[-1]) as im:
        im.convert("RGB").save(folder / "as_jpeg.jpg", format="JPEG", quality=90)
    return folder


def test_served_champion_scores_like_inspect(inspect_data, fitted, other_state, registry, tmp_path, monkeypatch,
                                             capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry download cache
    state = fitted["patchcore"] / "state"
    folder = _inputs(inspect_data, tmp_path)
    out = tmp_path / "out"
    assert run_cli("inspect", "--model", registry.champion, "--tracking-uri", registry.uri, "--state", state,
                   "--device", "cpu", "--no-progress", "--out", out, folder) == 0
    assert f"(version {registry.version})" in capsys.readouterr().out
    assert run_cli("inspect", "--model", f"models:/{registry.name}@nobody", "--tracking-uri", registry.uri,
                   "--state", state, "--out", tmp_path / "x", folder) == 2
    assert "not found in the registry" in capsys.readouterr().err
    rows = read_results(out)
    assert len(rows) == len(inspect_data.test_images()) + 1 and all(r["status"] == "ok" for r in rows)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri, "MLFLOW_REGISTRY_URI": registry.uri,
           "HOME": str(tmp_path)}
    mlflow_cmd = os.path.join(os.path.dirname(sys.executable), "mlflow")
    with open(log, "w") as f:
        proc = subprocess.Popen([mlflow_cmd, "models", "serve", "-m", registry.champion, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, proc, log)
        encoded = [base64.b64encode(Path(r["path"]).read_bytes()).decode() for r in rows]
        by_bytes = _invoke(url, "image", encoded + ["%%% not base64"], state)
        assert by_bytes.status_code == 200, by_bytes.text
        by_path = _invoke(url, "path", [r["path"] for r in rows], state)
        assert by_path.status_code == 200, by_path.text
        for answer in (by_bytes.json()["predictions"][: len(rows)], by_path.json()["predictions"]):
            assert len(answer) == len(rows)
            for got, want in zip(answer, rows):
                assert got["score"] == pytest.approx(float(want["score"]), abs=1e-5), want["path"]
                assert got["decision"] == want["decision"] and got["error"] is None
        bad = by_bytes.json()["predictions"][-1]
        assert bad["score"] is None and bad["decision"] is None and bad["error"].startswith("image: not base64")
        refused = _invoke(url, "image", encoded[:1], other_state)
        assert refused.status_code >= 400 and "was fitted with model" in refused.text
        missing = requests.post(url + "/invocations", json={"dataframe_split": {"columns": ["image"],
                                                                                "data": [[encoded[0]]]}}, timeout=60)
        assert missing.status_code >= 400 and "needs params={'state': DIR}" in missing.text
    finally:
        _stop(proc)
    assert proc.returncode is not None
