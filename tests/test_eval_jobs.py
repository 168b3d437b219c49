"""Evaluation jobs end to end on synthetic MVTec-layout shards with the real EfficientNet-Lite0
weights and a randomly initialised projector: every (dataset, class, method, kind) gives
valid maps and scores, Ray-parallel equals in-process, image-level-only sources report
pixel metrics as n/a, results reach files and MLflow, and the champion alias moves (or not)
on a real sqlite registry."""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from shards.errors import DataError, UserError
from pipeline.evaluate.jobs import evaluate
from pipeline.evalspec import METHODS, METRICS, PIXEL_METRICS
from pipeline.evaluate.results import NA
from tiny_chain import shards_and_export, tiny_chain_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "evaltest-projector"
SELECTION = "patchcore/pretrained/image_auroc"


# the learned methods with the smallest budgets that still train (their quality: test_eval_learned.py)
TINY_BUDGETS = {"cflow": {"blocks": 2, "epochs": 1}, "glass": {"hidden": 32, "steps": 2, "epochs": 1},
                "uniad": {"hidden": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1, "ff": 32, "dropout": 0.0,
                          "neighbour": 3, "epochs": 1}}


def _config(tmp: str) -> dict:
    # the eval images again, declared image-level only; one method, the gate off: the value
    # comparison alone (the gate: test_the_gate_keeps_...)
    nomask = {"name": "heldout-nomask", "layout": "mvtec", "root": f"{tmp}/data/eval", "split": "eval", "masks": "none"}
    return tiny_chain_config(
        tmp, "evaltest", tracking={"model_name": MODEL}, more_eval_sources=(nomask,),
        eval={"k_shot": 2, "selection_metric": SELECTION, "gate": {}, "methods": list(METHODS), **TINY_BUDGETS})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    """Shards of three eval/val sources, a pretraining run in MLflow, and its export."""
    from pipeline.paths import export_dir

    tmp = str(tmp_path_factory.mktemp("evaljobs"))
    raw = _config(tmp)
    cfg = load_config(raw)
    pretrain_run = shards_and_export(cfg)
    export = export_dir(cfg)
    path = os.path.join(tmp, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return SimpleNamespace(tmp=tmp, raw=raw, cfg=cfg, path=path, export=export, pretrain_run=pretrain_run)


def _client(cfg):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import resolve_uri

    uri = resolve_uri(cfg.tracking.uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias(client, name: str) -> str:
    return str(client.get_model_version_by_alias(MODEL, name).version)


def _read_csv(path: str) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row = {k: r[k] for k in ("split", "source", "class", "method", "kind")}
        row.update({m: None if r[m] == NA else float(r[m]) for m in METRICS})
        row.update({k: int(r[k]) for k in ("n_fit", "n_test", "n_test_abnormal")})
        out.append(row)
    return out


def test_parallel_equals_sequential_files_and_mlflow(setup, capsys):
    from pipeline.cli import main

    cfg = setup.cfg
    seq = evaluate(cfg, parallel=False, progress=False)

    # every (source, class, method, kind), and the means
    per_class = [r for r in seq.rows if r["class"] != "mean"]
    keys = {(r["source"], r["class"], r["method"], r["kind"]) for r in per_class}
    assert keys == {(s, c, m, k) for s, c in [("heldout", "synth_leather"), ("heldout-nomask", "synth_leather"),
                                              ("valset", "synth_tile")]
                    for m in cfg.eval.methods for k in cfg.eval.kinds}
    assert len(per_class) == len(keys)
    assert {(r["source"], r["method"], r["kind"]) for r in seq.rows if r["class"] == "mean"} == \
        {(s, m, k) for s, _, m, k in keys}
    for r in per_class:
        assert r["n_fit"] == 8 - 2 and r["n_test"] == 2 + 3 and r["n_test_abnormal"] == 3
        for m in METRICS:
            if r["source"] == "heldout-nomask" and m in PIXEL_METRICS:
                assert r[m] is None, (r, m)  # image-level-only source: not available, never 0
            else:
                assert r[m] is not None and 0.0 <= r[m] <= 1.0 and math.isfinite(r[m]), (r, m)

    # references: K normal training images per class, fixed and recorded
    with open(seq.files["references"]) as f:
        refs = json.load(f)
    assert refs["k_shot"] == 2
    for name, keys_ in refs["references"].items():
        assert len(keys_) == 2 and all("+train+good+" in k for k in keys_), keys_
        assert not set(keys_) & set(refs["test_images"][name])
    assert seq.references == refs["references"]

    # the Ray job through the CLI equals the in-process run, number for number
    assert main(["evaluate", setup.path, "--checkpoint", setup.export]) == 0
    printed = capsys.readouterr().out
    assert "| eval | heldout | mean | patchcore | pretrained |" in printed and "results.csv" in printed
    par = _read_csv(seq.files["csv"])
    assert par == [{k: r[k] for k in par[0]} for r in seq.rows]
    with open(seq.files["references"]) as f:
        assert json.load(f) == refs

    # files and pictures
    md = open(seq.files["markdown"]).read()
    assert "| eval | heldout-nomask | synth_leather | featurenorm | raw |" in md and NA in md
    assert "## Pretrained features against the other kinds: image AUROC" in md
    with open(seq.files["intervals"]) as f:
        intervals = json.load(f)
    assert intervals["level"] == 0.95 and intervals["metric"] == "image_auroc"
    # every source, method and ordered pair of kinds, each difference the difference of the class means
    assert len(intervals["rows"]) == 3 * len(cfg.eval.methods) * len(cfg.eval.kinds) * (len(cfg.eval.kinds) - 1)
    auroc = {(r["source"], r["method"], r["kind"]): r["image_auroc"] for r in per_class}
    for r in intervals["rows"]:
        assert r["classes"] == 1 and r["low"] <= r["high"]
        want = auroc[r["source"], r["method"], r["kind"]] - auroc[r["source"], r["method"], r["against"]]
        assert r["diff"] == pytest.approx(want, abs=1e-12)
    assert all("interval" in c for c in seq.selection["gate"]["checks"])
    pics = sorted(os.listdir(os.path.join(seq.out_dir, "pictures", "maps")))
    assert pics == ["heldout-nomask__synth_leather.png", "heldout__synth_leather.png", "valset__synth_tile.png"]
    for sub in ("maps", "norms"):
        for p in pics:
            with open(os.path.join(seq.out_dir, "pictures", sub, p), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # the MLflow evaluation run: a child of the pretraining run, metrics per class and means, artifacts
    run = _client(cfg).get_run(seq.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == setup.pretrain_run
    m = run.data.metrics
    row = next(r for r in per_class if (r["source"], r["method"], r["kind"]) == ("heldout", "padim", "pretrained"))
    assert m["heldout/synth_leather/padim/pretrained/aupro"] == row["aupro"]
    assert "mean/heldout/padim/pretrained/image_auroc" in m
    assert "heldout-nomask/synth_leather/padim/raw/image_auroc" in m
    assert not any(k.startswith("heldout-nomask/") and k.endswith(PIXEL_METRICS) for k in m)
    assert m["selection/value"] == seq.selection["new_value"]
    arts = {a.path for a in _client(cfg).list_artifacts(seq.run_id, "evaluation")}
    assert {"evaluation/results.csv", "evaluation/results.md", "evaluation/references.json",
            "evaluation/intervals.json", "evaluation/pictures"} <= arts
    # no registered version: the selection value is computed on val only, nothing is decided
    val = [r["image_auroc"] for r in per_class if r["source"] == "valset"
           and (r["method"], r["kind"]) == ("patchcore", "pretrained")]
    assert seq.selection["new_value"] == pytest.approx(sum(val) / len(val))
    assert seq.selection["decision"] is None


def test_champion_promotion_and_non_promotion(setup):
    from pipeline.tracking import RunTracker, select_champion

    cfg, client = setup.cfg, _client(setup.cfg)
    tracker = RunTracker.attach(cfg.tracking, setup.pretrain_run)
    v1 = tracker.log_model(setup.export, MODEL, tags={})
    tracker.end("FINISHED")
    mv1 = client.get_model_version(MODEL, v1)
    v2 = str(client.create_model_version(MODEL, source=mv1.source, run_id=setup.pretrain_run).version)
    # a weak champion: version 1 with a recorded validation value of 0
    select_champion(cfg.tracking, v1, SELECTION, 0.0)
    assert alias(client, "champion") == v1

    # version 2 beats it on the val sources: promoted
    r2 = evaluate(cfg, model=f"models:/{MODEL}/{v2}", sources=["valset"], parallel=False, progress=False)
    assert {r["source"] for r in r2.rows} == {"valset"}
    s = r2.selection
    assert s["new_value"] > 0.0
    assert (s["decision"], s["version"], s["previous_champion"], s["champion_value"]) == ("champion", v2, v1, 0.0)
    assert alias(client, "champion") == v2
    run = client.get_run(r2.run_id)
    assert json.loads(run.data.tags["adpretrain.selection"])["decision"] == "champion"
    assert run.data.metrics["selection/value"] == s["new_value"]
    assert run.data.metrics["selection/champion_value"] == 0.0

    # version 1 again (an export folder that knows its registered version): the same weights score
    # the same, which does not beat the champion: challenger, and the champion stays
    folder = os.path.join(setup.tmp, "export-v1")
    shutil.copytree(setup.export, folder)
    with open(os.path.join(folder, "registered.json"), "w") as f:
        json.dump({"name": MODEL, "version": v1}, f)
    r1 = evaluate(cfg, checkpoint=folder, sources=["valset"], parallel=False, progress=False)
    s = r1.selection
    assert s["new_value"] == r2.selection["new_value"]
    assert (s["decision"], s["version"], s["previous_champion"]) == ("challenger", v1, v2)
    assert s["champion_value"] == r2.selection["new_value"]
    assert alias(client, "champion") == v2
    assert alias(client, "challenger") == v1
    run = client.get_run(r1.run_id)
    assert run.data.metrics["selection/value"] == run.data.metrics["selection/champion_value"]
    assert "challenger" in r1.describe()


def test_a_version_of_another_store_is_not_decided_and_a_failed_decision_keeps_the_evaluation(setup, caplog):
    """An export folder registered in another tracking store is evaluated as unregistered (no alias
    moves, a warning says why); a decision the registry refuses comes after the evaluation is
    written, and its error says where."""
    from pipeline.paths import eval_dir
    from pipeline.tracking import resolve_uri

    cfg = setup.cfg
    here = resolve_uri(cfg.tracking.uri)

    def copy(name: str, version: str, store: str) -> str:
        folder = os.path.join(setup.tmp, name)
        shutil.copytree(setup.export, folder)
        with open(os.path.join(folder, "registered.json"), "w") as f:
            json.dump({"name": MODEL, "version": version, "tracking_uri": store}, f)
        return folder

    elsewhere = copy("export-elsewhere", "1", "sqlite:////somewhere/else.db")
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate.model"):
        r = evaluate(cfg, checkpoint=elsewhere, sources=["valset"], parallel=False, progress=False)
    assert r.selection["version"] is None and r.selection["decision"] is None
    assert f"registered as {MODEL} version 1 in another tracking store (sqlite:////somewhere/else.db, not {here})" \
        in caplog.text

    missing = copy("export-missing", "999", here)
    out = eval_dir(cfg)
    shutil.rmtree(out, ignore_errors=True)
    with pytest.raises(UserError, match=f"version 999 at .* failed: .*; the evaluation itself is written to {out} "):
        evaluate(cfg, checkpoint=missing, sources=["valset"], parallel=False, progress=False)
    with open(os.path.join(out, "selection.json")) as f:
        s = json.load(f)
    assert s["version"] == "999" and s["decision"] is None and "version 999" in s["decision_error"]
    assert os.path.isfile(os.path.join(out, "results.md")) and os.path.isfile(os.path.join(out, "intervals.json"))


def test_the_gate_keeps_a_version_that_fails_it_from_champion(setup):
    """A gate no version can pass (pretrained must beat raw by more than 1): the version becomes
    challenger even with no champion and a selection value above zero, and the failed comparison
    is in the selection, the summary, the registry's tag and the report."""
    from pipeline.report import selection_html
    from pipeline.tracking import RunTracker

    cfg = load_config({**setup.raw, "eval": {**setup.raw["eval"], "gate": {"raw": 1.0}},
                       "tracking": {**setup.raw["tracking"], "model_name": "gated"}})
    client = _client(cfg)
    tracker = RunTracker.attach(cfg.tracking, setup.pretrain_run)
    version = tracker.log_model(setup.export, "gated", tags={})
    tracker.end("FINISHED")
    result = evaluate(cfg, model=f"models:/gated/{version}", sources=["valset"], parallel=False, progress=False)
    s = result.selection
    [check] = s["gate"]["checks"]
    assert (check["method"], check["kind"], check["against"], check["margin"]) == ("patchcore", "pretrained", "raw", 1.0)
    assert check["value"] == pytest.approx(s["new_value"]) and not check["passed"]
    assert s["gate"]["passed"] is False and s["decision"] == "challenger" and s["gate_failed"] == s["gate"]["failed"]
    assert alias(client, "challenger") == version
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias("gated", "champion")
    line = s["gate"]["failed"][0]
    assert line.startswith("patchcore: pretrained ") and "does not beat raw" in line and "+ 1" in line
    assert f"gate failed        {line}" in result.describe()
    tag = json.loads(client.get_model_version("gated", version).tags["adpretrain.selection"])
    assert tag["decision"] == "challenger" and tag["gate_failed"] == [line]
    assert f"No-regression gate failed:</b> {html.escape(line)}</p>" in selection_html(s)


def test_user_errors(setup):
    raw = {**setup.raw, "workdir": os.path.join(setup.tmp, "elsewhere")}
    with pytest.raises(UserError, match="run `adpretrain pretrain CONFIG` first or pass --model"):
        evaluate(load_config(raw), parallel=False, progress=False)
    # a selection metric the config cannot compute fails when the config is read, before any work
    with pytest.raises(ConfigError, match="eval.selection_metric 'patchcore/raw/auc'"):
        load_config({**setup.raw, "eval": {**setup.raw["eval"], "selection_metric": "patchcore/raw/auc"}})
    with pytest.raises(UserError, match="not eval/val sources"):
        evaluate(setup.cfg, sources=["pre"], parallel=False, progress=False)
    # an error inside a Ray task reaches the caller as the same one-line error
    few = load_config({**setup.raw, "eval": {**setup.raw["eval"], "k_shot": 8}})
    with pytest.raises(DataError, match="8 normal training images, but eval.k_shot=8 references"):
        evaluate(few, sources=["valset"], parallel=True, progress=False)
    # the cluster entry point reports a user error in one line, exit code 2
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "evaluate.py"), "--config", setup.path,
                          "--checkpoint", os.path.join(setup.tmp, "missing")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "is not an exported projector folder" in out.stderr.splitlines()[-1]


def test_unreadable_shards_stop_the_evaluation(setup, tmp_path):
    """A shard cut short or corrupt stops the evaluation with a DataError naming it: before any
    task when its size differs from the manifest's, in the task that decodes it otherwise
    (even when the tar reader alone would see a shorter, valid-looking shard)."""
    import tarfile

    from pipeline.evaluate.plan import decode_shard
    from shards.manifest import read_manifest

    url = str(tmp_path / "shards")
    shutil.copytree(setup.cfg.shards.url, url)
    cfg = load_config({**setup.raw, "shards": {**setup.raw["shards"], "url": url}})
    entry = next(e for e in read_manifest(url)["shards"] if e["source"] == "heldout" and e["count"] > 2)
    path = os.path.join(url, entry["path"])
    with open(path, "rb") as f:
        intact = f.read()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    image = next(m for m in members if m.name.endswith(".png") and "mask" not in m.name)
    last = next(m for m in members if m.name.startswith(members[-1].name.split(".")[0] + "."))

    def write(data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    def refused(match: str, **kw) -> None:
        with pytest.raises(DataError, match=match) as e:
            evaluate(cfg, sources=["heldout"], progress=False, **kw)
        assert path in str(e.value) and "adpretrain build-shards" in str(e.value)

    # cut at a member boundary: a shorter tar that reads without error
    write(intact[: last.offset])
    refused("differ from the manifest", parallel=False)
    with pytest.raises(DataError, match=rf"shard {path} cannot be read \({entry['count'] - 1} samples read, "
                                        rf"the manifest says {entry['count']}\)"):
        decode_shard(path, entry["count"], 112)
    # cut inside a member
    write(intact[: image.offset_data + image.size // 2])
    refused("differ from the manifest", parallel=True)
    with pytest.raises(DataError, match=f"shard {path} cannot be read"):
        decode_shard(path, entry["count"], 112)
    # the same size, one image's bytes overwritten: found by the Ray task that decodes it
    write(intact[: image.offset_data + 16] + b"\0" * (image.size - 32) + intact[image.offset_data + image.size - 16:])
    refused(f"shard {path} cannot be read", parallel=True)
    # the same size, a member header overwritten: the tar reader stops there without an error
    write(intact[: last.offset] + b"\xff" * 512 + intact[last.offset + 512:])
    refused(rf"shard {path} cannot be read \({entry['count'] - 1} samples read", parallel=False)
    write(intact)
    assert len(decode_shard(path, entry["count"], 112).keys) == entry["count"]
