"""`adpretrain inspect` end to end on synthetic images with a small real export: the seeded
reference/fit/calibration split, the threshold at a false-positive rate (against a brute force in
float64), results for every input (unreadable ones with their reason), overlay PNGs, a saved state
that reloads to byte-identical results, and the clear errors a user can cause."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.register_assert_rewrite("inspect_fixtures")  # also the plugin below
from inspect_fixtures import FIT_ARGS, read_results, run_cli  # noqa: E402
from pipeline.inspect.fit import calibrate_threshold, needed_calibration, split_good  # noqa: E402
from pipeline.inspect.overlay import contour  # noqa: E402
from pipeline.inspect.state import STATE_JSON, STATE_TENSORS, load_state  # noqa: E402
from shards.errors import UserError  # noqa: E402

pytest_plugins = ["inspect_fixtures"]


def brute_force_threshold(scores: np.ndarray, fpr: float) -> float:
    """The smallest t among all candidate thresholds (every score, and below them all) whose
    false-positive rate #{s > t} / n is <= fpr, in float64."""
    s = scores.astype(np.float64)
    candidates = sorted(set(s.tolist()) | {float(s.min()) - 1.0})
    ok = [t for t in candidates if np.count_nonzero(s > t) / len(s) <= fpr + 1e-12]
    return min(ok)


def test_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(10, 60))
        fpr = float(rng.choice([0.01, 0.05, 0.1, 0.2, 0.25, 1 / 3]))
        scores = rng.normal(size=n).astype(np.float32)
        if trial % 3 == 0:  # ties
            scores = np.round(scores, 1)
        t = calibrate_threshold(torch.from_numpy(scores), fpr)
        assert t == brute_force_threshold(scores, fpr), (n, fpr)
        assert np.count_nonzero(scores.astype(np.float64) > t) / n <= fpr
    # fpr 0.1 on 10 images: one may lie above the threshold, the threshold is the second highest score
    assert calibrate_threshold(torch.arange(10.0), 0.1) == 8.0
    assert needed_calibration(0.01) == 100 and needed_calibration(0.1) == 10 and needed_calibration(0.3) == 4


def test_good_split_is_seeded_disjoint_and_checked():
    files = [f"g{i:03d}.png" for i in range(30)]
    a = split_good(files, 4, "patchcore", 0.1, seed=3)
    assert split_good(files, 4, "patchcore", 0.1, seed=3) == a
    assert split_good(files, 4, "patchcore", 0.1, seed=4) != a
    assert (len(a.references), len(a.calibration), len(a.fit)) == (4, 13, 13)
    assert sorted(a.references + a.calibration + a.fit) == files
    fn = split_good(files, 4, "featurenorm", 0.1, seed=3)
    assert fn.fit == [] and len(fn.calibration) == 26  # nothing to fit: every other image calibrates
    with pytest.raises(UserError, match=r"needs at least 100 calibration images .* 203 good images are needed"):
        split_good(files, 4, "patchcore", 0.01, seed=0)
    with pytest.raises(UserError, match=r"104 good images are needed.*lowest is 0.03846"):
        split_good(files, 4, "featurenorm", 0.01, seed=0)
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        split_good(files, 4, "patchcore", 1.0, seed=0)


def test_contour_is_the_inner_boundary():
    rng = np.random.default_rng(1)
    mask = rng.random((9, 11)) > 0.4
    want = np.zeros_like(mask)
    for i in range(9):
        for j in range(11):
            nb = [(i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)]
            outside = any(not (0 <= a < 9 and 0 <= b < 11) or not mask[a, b] for a, b in nb)
            want[i, j] = mask[i, j] and outside
    assert (contour(mask) == want).all()


def test_inspect_outputs_and_state(inspect_data, fitted):
    d = inspect_data
    out = fitted["patchcore"]
    rows = read_results(out)
    images = d.test_images()
    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert all(r["status"] == "ok" and r["decision"] in ("anomalous", "normal") for r in rows)
    state = load_state(str(out / "state"))
    assert sorted(os.listdir(out / "state")) == [STATE_JSON, STATE_TENSORS]  # JSON + safetensors, no pickle
    for r in rows:
        assert (r["decision"] == "anomalous") == (float(r["score"]) > state.threshold)
        with Image.open(out / r["overlay"]) as im:
            assert im.format == "PNG" and im.size[0] >= 256
    assert state.method == "patchcore" and state.image_size == 64 and state.bf16 is False
    assert state.counts["references"] == 2 and state.counts["calibration"] >= needed_calibration(0.1)
    assert state.tensors["memory"].shape[1] == sum(b.shape[-1] for b in state.bank)
    assert state.model["digest"] and state.model["label"] == str(d.export)
    summary = json.loads((out / "results.json").read_text())
    assert summary["counts"]["scored"] == len(images) and summary["threshold"] == state.threshold
    # the threshold is what calibrating on the state's calibration images gives (fpr reached <= asked)
    assert state.calibration["fpr_reached"] <= 0.1
    for method in ("featurenorm", "padim"):
        other = load_state(str(fitted[method] / "state"))
        assert other.method == method and other.counts["fit"] == (0 if method == "featurenorm" else 12)


def test_state_reuse_is_byte_identical_and_unreadable_inputs_are_listed(inspect_data, fitted, tmp_path, capsys):
    d = inspect_data
    bad = tmp_path / "inputs"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("not an image")  # not an input: counted as ignored
    shutil.copy(d.test_images()[0], bad / "copy.png")
    argv = ["inspect", "--model", d.export, "--state", fitted["patchcore"] / "state", "--device", "cpu",
            "--no-progress", d.test, bad, tmp_path / "missing.png"]
    assert run_cli(*argv, "--out", tmp_path / "a") == 0
    text = capsys.readouterr().out
    assert run_cli(*argv, "--out", tmp_path / "b") == 0
    a, b = (tmp_path / "a" / "results.csv").read_bytes(), (tmp_path / "b" / "results.csv").read_bytes()
    assert a == b
    rows = read_results(tmp_path / "a")
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.png"]["status"] == "unreadable" and "cannot decode" in by_name["broken.png"]["error"]
    assert by_name["empty.jpg"]["error"] == "empty file"
    assert by_name["missing.png"]["error"] == "no such file or folder"
    assert by_name["copy.png"]["score"] == rows[0]["score"]  # the same image scores the same
    # the reused state gives the scores of the fitting run, image by image
    first = {r["path"]: r["score"] for r in read_results(fitted["patchcore"])}
    assert all(first[r["path"]] == r["score"] for r in rows if r["path"] in first)
    assert "state reused" in text and "3 unreadable" in text and "1 non-image files" in text
    assert "broken.png: cannot decode" in text


def test_state_of_another_model_and_conflicting_flags_are_refused(inspect_data, fitted, other_state, tmp_path, capsys):
    d = inspect_data
    img = d.test_images()[0]
    code = run_cli("inspect", "--model", d.export, "--state", other_state, "--out", tmp_path / "x", img)
    assert code == 2
    err = capsys.readouterr().err
    assert "was fitted with model" in err and "digest" in err and "fit a new state" in err
    code = run_cli("inspect", "--model", d.export, "--state", fitted["padim"] / "state", "--method", "patchcore",
                   "--out", tmp_path / "y", img)
    assert code == 2 and "--method patchcore: the state" in capsys.readouterr().err


def test_user_errors(inspect_data, tmp_path, capsys):
    d = inspect_data
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(d.good.glob("*.png"))[:12]:
        shutil.copy(p, few / p.name)
    img = d.test_images()[0]
    cases = [
        (["--good", few, "--method", "patchcore", *FIT_ARGS], r"12 good images are too few: --fpr 0.1 needs at least "
                                                              r"10 calibration images"),
        (["--good", d.good, "--device", "cuda" if not torch.cuda.is_available() else "tpu"],
         "asks for a CUDA GPU" if not torch.cuda.is_available() else "use auto, cpu, cuda or cuda:N"),
        (["--method", "patchcore"], "--good DIR is needed"),
    ]
    for extra, message in cases:
        assert run_cli("inspect", "--model", d.export, *extra, "--out", tmp_path / "o", img) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    shutil.copy(d.export / "projector.safetensors", ckpt / "projector.safetensors")
    assert run_cli("inspect", "--model", ckpt, "--good", d.good, *FIT_ARGS, "--out", tmp_path / "o", img) == 2
    assert "looks like a training checkpoint" in capsys.readouterr().err


def test_device_choice():
    from pipeline.inspect.model import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cuda", torch.cuda.current_device())
        assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    else:
        assert resolve_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:1"):
            with pytest.raises(UserError, match=rf"--device {name} asks for a CUDA GPU.*--device cpu"):
                resolve_device(name)
    with pytest.raises(UserError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
