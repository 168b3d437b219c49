"""The shard-building stage end to end: local and s3:// (moto server), read back through
webdataset and compared with the sources sample by sample; reruns that write nothing; plans;
unreachable and wrongly-credentialed stores."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.stages import Context, shards as shards_stage, synth as synth_stage
from shard_helpers import build, config, decode, read_samples, snapshot
from shards.errors import StorageError
from shards import storage
from shards.manifest import read_manifest, shard_urls, summary_table
from shards.record import SampleRecord
from shards.sources import scan_source
from shards.writer import estimated_bytes, plan_stream


def compare_with_sources(samples: list[dict], cfg) -> None:
    """Every record of every source is in the shards exactly once, byte for byte, with its
    metadata; masks are the binarised source masks; nothing else is in the shards."""
    records = {r.key: r for s in cfg.sources for r in scan_source(s).records}
    assert len(samples) == len(records)
    for smp in samples:
        rec: SampleRecord = records.pop(smp["__key__"])
        meta = json.loads(smp["json"])
        data = storage.read_bytes(rec.url)
        assert smp[meta["image_ext"]] == data
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert {k: meta[k] for k in ("source", "class", "view", "split", "role", "label", "defect", "path")} == {
            "source": rec.source, "class": rec.cls, "view": rec.view, "split": rec.split, "role": rec.role,
            "label": rec.label, "defect": rec.defect, "path": rec.path,
        }
        h, w = decode(data).shape[:2]
        assert (meta["width"], meta["height"]) == (w, h)
        assert meta["has_mask"] == rec.has_mask == ("mask.png" in smp)
        if rec.has_mask:
            source_mask = decode(storage.read_bytes(rec.mask_url))
            np.testing.assert_array_equal(decode(smp["mask.png"]), np.where(source_mask > 0, 255, 0))
        stream = smp["__url__"].split("/")[-2]
        assert stream == rec.stream and f"/{rec.source}/{rec.role}/{stream}/shard-" in smp["__url__"]
    assert records == {}


# ----------------------------------------------------------------------------- local build


def test_build_local_read_back_and_rerun_writes_nothing(ray_local, trees, tmp_path):
    out = tmp_path / "shards"
    cfg = config(
        str(out),
        [
            {"name": "mv", "layout": "mvtec", "root": str(trees / "mvtec"), "split": "pretrain"},
            {"name": "iad", "layout": "realiad", "root": str(tmp_path / "realiad"), "split": "pretrain",
             "synth": {"classes": 1, "normal": 3, "abnormal": 2, "size": 32, "views": 5}},
            {"name": "vi", "layout": "visa", "root": str(trees / "visa"), "split": "val"},
            {"name": "bt", "layout": "btad", "root": str(trees / "btad"), "split": "eval"},
        ],
        tmp_path,
    )
    manifest = build(cfg)
    assert (tmp_path / "realiad" / "realiad_512").is_dir()  # generated from the source's synth spec
    assert json.loads((out / "manifest.json").read_text()) == {k: v for k, v in manifest.items() if k != "build"}
    assert read_manifest(str(out)) == json.loads((out / "manifest.json").read_text())

    # Every shard: where the manifest says, with its size, sha256 and sidecar.
    for s in manifest["shards"]:
        data = (out / s["path"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
        side = json.loads((out / (s["path"] + ".json")).read_text())
        assert (side["sha256"], side["count"], side["bytes"]) == (s["sha256"], s["count"], s["bytes"])
        assert s["count"] <= 5
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"manifest.json", "build-info.json"} | {s["path"] for s in manifest["shards"]} | {
        s["path"] + ".json" for s in manifest["shards"]
    }

    samples = read_samples(shard_urls(manifest, str(out)))
    compare_with_sources(samples, cfg)

    # Counts: per source/class/view/label/defect, as the samples say; totals add up.
    got = Counter()
    for smp in samples:
        m = json.loads(smp["json"])
        got[(m["source"], m["class"], m["view"], m["label"], m["defect"])] += 1
    assert {(c["source"], c["class"], c["view"], c["label"], c["defect"]): c["count"] for c in manifest["counts"]} == got
    t = manifest["totals"]
    # Every file under the roots: the images and masks written, synth_info.json in each root and the
    # split and annotation files (ignored).
    assert t["inputs"] == t["written"] + t["quarantined"] + t["ignored"] and t["quarantined"] == 0
    assert t["written"] == len(samples) + t["masks"] and t["normal"] + t["abnormal"] == len(samples)
    in_root, split_files = "non-image files in the root", "split files"
    assert {n: {r.split(" (")[0]: k for r, k in src["ignored_by_rule"].items()}
            for n, src in manifest["sources"].items()} == {
        "mv": {in_root: 1}, "bt": {in_root: 1},
        "iad": {in_root: 1, split_files: 1}, "vi": {in_root: 1, split_files: 1, "annotation files": 2},
    }
    assert {s["split"] for s in manifest["shards"] if s["source"] == "vi"} == {"val"}
    assert Counter(m["view"] for m in (json.loads(x["json"]) for x in samples) if m["source"] == "iad") == {
        f"C{v}": 5 for v in range(1, 6)
    }
    assert len(shard_urls(manifest, str(out), source="mv", split="pretrain", stream="abnormal")) == 2
    assert shard_urls(manifest, str(out), source="mv", split="eval") == []

    table = summary_table(manifest)
    rows = {tuple(line.split()[:2]) for line in table.splitlines()}
    for name, src in manifest["sources"].items():
        for cls, c in src["classes"].items():
            assert (c["normal"], c["abnormal"]) > (0, 0) and (name, cls) in rows, table
    assert {(n, c) for n, s in manifest["sources"].items() for c in s["classes"]} >= {("bt", "01"), ("bt", "02")}
    assert "images/s" in table

    # A rerun finds everything committed and writes nothing at all.
    before = snapshot(out)
    again = build(cfg)
    assert again["build"]["shards_written"] == 0 and snapshot(out) == before
    assert {k: v for k, v in again.items() if k != "build"} == json.loads((out / "manifest.json").read_text())


def test_changed_plan_replaces_old_shards(ray_local, trees, tmp_path):
    out = tmp_path / "shards"
    src = [{"name": "bt", "layout": "btad", "root": str(trees / "btad"), "split": "pretrain"}]
    build(config(str(out), src, tmp_path, max_samples_per_shard=2))
    manifest = build(config(str(out), src, tmp_path, max_samples_per_shard=4))
    files = {str(p.relative_to(out)) for p in out.rglob("*.tar*")}
    assert files == {s["path"] for s in manifest["shards"]} | {s["path"] + ".json" for s in manifest["shards"]}
    assert all(s["count"] <= 4 for s in manifest["shards"]) and max(s["count"] for s in manifest["shards"]) > 2
    compare_with_sources(read_samples(shard_urls(manifest, str(out))), config(str(out), src, tmp_path))


def test_same_size_edit_in_place_is_rebuilt(ray_local, trees, tmp_path):
    root = tmp_path / "bt"
    shutil.copytree(trees / "btad", root)
    out = tmp_path / "shards"
    cfg = config(str(out), [{"name": "bt", "layout": "btad", "root": str(root), "split": "pretrain"}], tmp_path)
    build(cfg)
    manifest_before = (out / "manifest.json").read_text()
    bmp = sorted(root.glob("*/train/ok/*.bmp"))[0]
    size = bmp.stat().st_size
    Image.fromarray(255 - decode(bmp.read_bytes())).save(bmp)  # a corrected image: same format, same size
    assert bmp.stat().st_size == size
    before = snapshot(out)
    manifest = build(cfg)
    assert manifest["build"]["shards_written"] == 1
    after = snapshot(out)
    rewritten = sorted(p for p in after if after[p] != before.get(p) and p.endswith(".tar"))
    assert len(rewritten) == 1 and (out / "manifest.json").read_text() != manifest_before
    sample = next(x for x in read_samples([str(out / rewritten[0])])
                  if json.loads(x["json"])["path"] == str(bmp.relative_to(root)))
    assert sample["bmp"] == bmp.read_bytes()
    # Nothing changed since: a rerun writes nothing.
    assert build(cfg)["build"]["shards_written"] == 0 and snapshot(out) == after


def test_done_when_the_manifest_is_that_of_todays_inputs(ray_local, trees, tmp_path):
    root = tmp_path / "bt"
    shutil.copytree(trees / "btad", root)
    cfg = config(str(tmp_path / "shards"), [{"name": "bt", "layout": "btad", "root": str(root), "split": "pretrain"}],
                 tmp_path)
    assert not shards_stage.done(cfg, Context())
    manifest = build(cfg)
    assert shards_stage.done(cfg, Context())
    assert shards_stage.summary(manifest) == f"{manifest['totals']['normal'] + manifest['totals']['abnormal']} samples " \
        f"in {len(manifest['shards'])} shards, 0 quarantined"
    bmp = sorted(root.glob("*/train/ok/*.bmp"))[0]
    Image.fromarray(255 - decode(bmp.read_bytes())).save(bmp)
    assert not shards_stage.done(cfg, Context())
    build(cfg)
    assert shards_stage.done(cfg, Context())


def test_data_stage_generates_missing_synthetic_roots(tmp_path):
    synth = {"classes": 1, "normal": 2, "abnormal": 1, "size": 32}
    cfg = config(str(tmp_path / "shards"), [
        {"name": "a", "layout": "mvtec", "root": str(tmp_path / "a"), "split": "pretrain", "synth": synth},
        {"name": "b", "layout": "visa", "root": str(tmp_path / "b"), "split": "pretrain", "synth": synth},
    ], tmp_path)
    assert not synth_stage.done(cfg, Context())
    made = synth_stage.run(cfg, Context())
    assert made == ["a", "b"] and synth_stage.summary(made) == "generated a, b"
    assert synth_stage.done(cfg, Context()) and (tmp_path / "a" / "synth_info.json").is_file()
    assert synth_stage.run(cfg, Context()) == [] and synth_stage.summary([]) == "skipped (roots exist)"


def test_plan_respects_sample_and_byte_limits():
    recs = [
        SampleRecord(key=f"s+c+train+good++{i:03d}", source="s", cls="c", view=None, split="train", role="pretrain",
                     label=0, defect="good", path=f"c/{i:03d}.png", url=f"/x/{i:03d}.png", size=size)
        for i, size in enumerate([400_000, 300_000, 350_000, 2_500_000, 10, 20, 30, 40, 50])
    ]
    plans = plan_stream(list(reversed(recs)), max_samples=3, max_bytes=1_000_000, masks=None)
    assert [p.path for p in plans] == [f"s/pretrain/normal/shard-{i:06d}.tar" for i in range(len(plans))]
    assert [[r.key[-3:] for r in p.records] for p in plans] == [
        ["000", "001"], ["002"], ["003"], ["004", "005", "006"], ["007", "008"]
    ]
    for p in plans:  # over the byte limit only when a single input is larger than it
        assert len(p.records) == 1 or sum(estimated_bytes(r) for r in p.records) <= 1_000_000
    assert plans[0].keys_hash() == plan_stream(recs, 3, 1_000_000, None)[0].keys_hash()


# ----------------------------------------------------------------------------- S3


def test_build_on_s3_from_s3_and_local_sources(ray_local, trees, s3_bucket, tmp_path):
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(trees / "mvtec") + "/", f"{s3_bucket[5:]}/data/mvtec/", recursive=True)
    url = f"{s3_bucket}/shards"
    cfg = config(
        url,
        [
            {"name": "mv", "layout": "mvtec", "root": f"{s3_bucket}/data/mvtec", "split": "pretrain"},
            {"name": "bt", "layout": "btad", "root": str(trees / "btad"), "split": "eval"},
        ],
        tmp_path,
    )
    manifest = build(cfg)
    assert read_manifest(url) == {k: v for k, v in manifest.items() if k != "build"}
    urls = shard_urls(manifest, url)
    assert urls and all(u.startswith(f"{s3_bucket}/shards/") for u in urls)
    compare_with_sources(read_samples(urls), cfg)
    for s in manifest["shards"]:
        data = storage.read_bytes(f"{url}/{s['path']}")
        assert hashlib.sha256(data).hexdigest() == s["sha256"]

    fs.invalidate_cache()
    before = {p: (i["size"], i.get("LastModified")) for p, i in fs.find(f"{s3_bucket[5:]}/shards", detail=True).items()}
    assert build(cfg)["build"]["shards_written"] == 0
    fs.invalidate_cache()
    assert {p: (i["size"], i.get("LastModified")) for p, i in fs.find(f"{s3_bucket[5:]}/shards", detail=True).items()} == before


def test_unreachable_or_wrongly_credentialed_store_fails_before_writing(ray_local, trees, s3_server, s3_bucket,
                                                                       tmp_path, monkeypatch):
    import requests
    import s3fs

    src = [{"name": "bt", "layout": "btad", "root": str(trees / "btad"), "split": "pretrain"}]
    with pytest.raises(StorageError, match="Create the bucket"):
        build(config("s3://no-such-bucket/shards", src, tmp_path))

    reply = requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0").json()  # credentials are checked now
    try:
        with pytest.raises(StorageError, match="credentials") as e:
            build(config(f"{s3_bucket}/shards", src, tmp_path))
        assert "PermissionError" in str(e.value)
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=str(reply["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]))
    fs, _ = storage.filesystem(s3_bucket)
    fs.invalidate_cache()
    assert fs.find(s3_bucket[5:]) == []

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no retries against a port that will never answer
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StorageError, match="AWS_ENDPOINT_URL") as e:
            build(config(f"{s3_bucket}/shards", src, tmp_path))
        assert dead in str(e.value) or "Could not connect" in str(e.value)
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()
