"""The shard-building stage on damaged data and interrupted builds: bad inputs quarantined and
accounted for, image-level-only sources, resume after SIGKILL, clear errors for user mistakes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from shard_helpers import REPO, build, config, decode, read_samples, snapshot
from shards.errors import DataError
from shards.manifest import read_manifest, shard_urls, summary_table
from shards.synth import generate


# ----------------------------------------------------------------------------- bad inputs


def _vandalise(root: Path) -> tuple[dict[str, str], str]:
    """Damage a copy of an mvtec tree: (path -> the start of the expected reason, a converted image)."""
    cls = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
    good = sorted((root / cls / "train" / "good").iterdir())
    test = sorted(p for p in (root / cls / "test").rglob("*.png") if p.parent.name != "good")
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    data = good[0].read_bytes()
    good[0].write_bytes(data[: len(data) // 2])
    good[1].write_bytes(os.urandom(300))
    rgba = np.dstack([decode(good[2].read_bytes()), np.full((32, 32), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(good[2])
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(good[3])
    mask = root / cls / "ground_truth" / test[0].parent.name / f"{test[0].stem}_mask.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    gone = root / cls / "ground_truth" / test[1].parent.name / f"{test[1].stem}_mask.png"
    gone.unlink()
    (root / "emptyclass").mkdir()
    return {
        rel(good[0]): "corrupt or truncated image",
        rel(good[1]): "image is not a readable image",
        rel(good[3]): "RGBA image with transparent pixels",
        rel(test[0]): "mask ",
        rel(mask): "mask of a quarantined image",
        rel(test[1]): "abnormal image without its mask",
        "emptyclass": "class folder has no images",
    }, rel(good[2])


def test_bad_inputs_are_quarantined_and_accounted_for(ray_local, trees, tmp_path):
    root = tmp_path / "dirty"
    shutil.copytree(trees / "mvtec", root)
    expected, converted = _vandalise(root)
    src = [{"name": "mv", "layout": "mvtec", "root": str(root), "split": "pretrain"}]
    out = tmp_path / "shards"
    manifest = build(config(str(out), src, tmp_path, max_quarantine_fraction=0.5))
    got = {q["path"]: q["reason"] for q in manifest["quarantined"]}
    assert set(got) == set(expected)
    for path, reason in expected.items():
        assert got[path].startswith(reason), (path, got[path])
    assert "differs from the image size" in got[next(p for p, r in expected.items() if r == "mask ")]
    t, s = manifest["totals"], manifest["sources"]["mv"]
    n_files = sum(1 for p in root.rglob("*") if not p.is_dir())  # images, masks, synth_info.json
    assert t["inputs"] == n_files + 1 == t["written"] + t["quarantined"] + t["ignored"]  # + the empty class folder
    assert t["quarantined"] == len(expected) and t["ignored"] == 1
    assert s["inputs"] == s["written"] + s["quarantined"] + s["ignored"]
    samples = read_samples(shard_urls(manifest, str(out)))
    assert len(samples) == t["normal"] + t["abnormal"] == t["written"] - t["masks"]
    conv = next(json.loads(x["json"]) for x in samples if json.loads(x["json"])["path"] == converted)
    assert (conv["converted"], conv["image_ext"], conv["mode"]) == ("RGBA->RGB", "png", "RGBA")
    assert summary_table(manifest).count("emptyclass") == 1

    # The same source under a 20 % budget (7 of 24 inputs are bad): a failed build with the
    # report, and no manifest.
    out2 = tmp_path / "shards2"
    with pytest.raises(DataError) as e:
        build(config(str(out2), src, tmp_path, max_quarantine_fraction=0.2))
    msg = str(e.value)
    assert "source 'mv'" in msg and "max_quarantine_fraction" in msg and "abnormal image without its mask" in msg
    assert not (out2 / "manifest.json").exists()
    info = json.loads((out2 / "build-info.json").read_text())
    assert info["status"] == "failed" and {q["path"] for q in info["quarantined"]} == set(expected)
    # Scan-time quarantine alone (2 of 24) over a 5 % budget: fails before writing anything.
    out3 = tmp_path / "shards3"
    with pytest.raises(DataError, match="nothing written"):
        build(config(str(out3), src, tmp_path, max_quarantine_fraction=0.05))
    assert not any(p.is_file() for p in out3.rglob("*"))


def test_image_level_only_source(ray_local, trees, tmp_path):
    root = tmp_path / "nomasks"
    shutil.copytree(trees / "mvtec", root)
    for gt in root.glob("*/ground_truth"):
        shutil.rmtree(gt)
    out = tmp_path / "shards"
    cfg = config(
        str(out),
        [
            {"name": "plain", "layout": "mvtec", "root": str(root), "split": "pretrain", "masks": "none"},
            {"name": "plain-eval", "layout": "mvtec", "root": str(root), "split": "eval", "masks": "none"},
            {"name": "mv", "layout": "mvtec", "root": str(trees / "mvtec"), "split": "pretrain"},
        ],
        tmp_path,
    )
    manifest = build(cfg)
    n_abnormal = manifest["sources"]["plain"]["abnormal"]
    assert n_abnormal == 6 and manifest["sources"]["plain"]["quarantined"] == 0
    assert manifest["sources"]["plain"]["excluded_from_training"] == n_abnormal
    assert manifest["sources"]["plain-eval"]["excluded_from_training"] == 0
    assert manifest["totals"]["excluded_from_training"] == n_abnormal
    # Training streams leave them out; evaluation gets them, without masks.
    assert shard_urls(manifest, str(out), source="plain", split="pretrain", stream="abnormal") == []
    assert shard_urls(manifest, str(out), split="pretrain", stream="abnormal") == shard_urls(
        manifest, str(out), source="mv", split="pretrain", stream="abnormal")
    ev = read_samples(shard_urls(manifest, str(out), source="plain-eval", stream="abnormal"))
    assert len(ev) == n_abnormal
    assert all("mask.png" not in x and json.loads(x["json"])["has_mask"] is False for x in ev)
    stored = [s for s in manifest["shards"] if s["source"] == "plain" and s["stream"] == "abnormal"]
    assert stored and all(s["masks"] is False for s in stored)
    assert sum(s["count"] for s in stored) == n_abnormal  # written, not lost
    assert "left out of the training streams" in summary_table(manifest)


# ----------------------------------------------------------------------------- resume after SIGKILL


def test_sigkilled_builds_resume_to_the_same_manifest(ray_local, tmp_path):
    root = tmp_path / "data"
    generate("mvtec", root, classes=3, normal=10, abnormal=4, size=48, seed=7)
    sources = [{"name": "mv", "layout": "mvtec", "root": str(root), "split": "pretrain"}]
    ref = tmp_path / "reference"
    build(config(str(ref), sources, tmp_path, max_samples_per_shard=2))
    n_shards = len(read_manifest(str(ref))["shards"])

    out = tmp_path / "resumed"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config(str(out), sources, tmp_path, max_samples_per_shard=2).to_dict()))
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, str(REPO / "launch" / "build_shards.py"), "--config", str(cfg_path), "--no-progress",
           f"ray.address={address}", "shards.tasks=1"]
    rng = np.random.default_rng(0)
    kills = 0
    for target in sorted(rng.choice(np.arange(1, n_shards - 1), size=3, replace=False)):
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if len(list(out.rglob("shard-*.tar.json"))) >= target:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait(30)
    assert kills >= 2, "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()

    manifest = build(config(str(out), sources, tmp_path, max_samples_per_shard=2))
    assert manifest["build"]["shards_kept"] >= 1
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    before = snapshot(out)
    assert build(config(str(out), sources, tmp_path, max_samples_per_shard=2))["build"]["shards_written"] == 0
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- user errors


def test_missing_manifest_and_bad_config_are_clear_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="run `adpretrain build-shards CONFIG`"):
        read_manifest(str(tmp_path / "nothing"))
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import build_shards as launcher
    finally:
        sys.path.remove(str(REPO / "launch"))
    cfg = config(str(tmp_path / "o"), [{"name": "a", "layout": "btad", "root": str(tmp_path), "split": "pretrain"}],
                 tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert launcher.main(["--config", str(path), "shards.max_samples_per_shard=0"]) == 2
    assert "shards.max_samples_per_shard" in capsys.readouterr().err
    assert launcher.main(["--config", str(path), "shards.max_sampels=3"]) == 2
    assert "shards.max_sampels: unknown key" in capsys.readouterr().err
    assert launcher.main(["--config", str(path), "sources.0.layout=nope"]) == 2
    assert "sources.0.layout" in capsys.readouterr().err
    assert launcher.main(["--config", str(path)]) == 2  # an empty root: no btad layout there
    assert "does not match the 'btad' layout" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
