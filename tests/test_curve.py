"""The validation curve (`adpretrain curve`, the chain's curve stage) on the prepared CI data:
a training run in a real MLflow sqlite store records checkpoints of projectors made here
(RunTracker.log_checkpoint, as the training loop does), its export names the run, and the
curve's values equal what an evaluation of each checkpoint's export gives; reruns reuse the
evaluated checkpoints, another training run reuses none of them."""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.register_assert_rewrite("pipeline_fixtures")  # also loaded as the plugin below
from pipeline_fixtures import CI_CONFIG, ci_overrides  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from shards.errors import UserError  # noqa: E402

pytest_plugins = ["pipeline_fixtures"]

STEPS = (3, 6, 9)
SELECTED = ("featurenorm", "patchcore", "padim")  # the default selection of configs/ci.yaml's six methods
VAL = "btad-synth-val"


def _train(cfg, name: str, seed: int, tmp) -> SimpleNamespace:
    """A finished training run with a checkpoint at each of STEPS (projectors of their own seeds),
    and the config's export of the last one; returns the run id and the weights by step."""
    from pipeline.backbone import build_backbone
    from pipeline.centers import load_centers
    from pipeline.export import save_export
    from pipeline.paths import centers_url, export_dir
    from pipeline.projector import Projector
    from pipeline.tracking import RunTracker, ensure_store

    ensure_store(cfg.tracking)
    backbone = build_backbone(cfg.backbone)
    tracker = RunTracker.start(cfg.tracking, cfg, run_name=name, tags={})
    states = {}
    for step in STEPS:
        with torch.random.fork_rng():
            torch.manual_seed(seed + step)
            states[step] = {k: v.contiguous() for k, v in
                            Projector.from_spec(backbone.widths, cfg.projector).state_dict().items()}
        path = tmp / f"{name}-{step}" / "projector.safetensors"
        path.parent.mkdir()
        save_file(states[step], str(path))
        tracker.log_checkpoint(step, f"{cfg.train.storage}/{name}/checkpoint_{step}", str(path))
    tracker.end("FINISHED")
    centers, _ = load_centers(centers_url(cfg, backbone.id))
    save_export(export_dir(cfg), states[STEPS[-1]], centers, backbone, cfg.backbone, cfg.projector,
                {"run_id": tracker.run_id, "run_name": name})
    return SimpleNamespace(run_id=tracker.run_id, states=states)


def _same_weights(folder: str, state: dict) -> bool:
    got = load_file(os.path.join(folder, "export", "projector.safetensors"))
    return got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in got)


@pytest.fixture(scope="module")
def trained(ray_local, prepared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    overrides = [*ci_overrides(prepared, tmp, name="curvetest"), "tracking.system_metrics=false"]
    cfg = load_config(CI_CONFIG, [*overrides, "eval.curve=true"])
    run = _train(cfg, "curvetest-a", 0, tmp)
    return SimpleNamespace(tmp=tmp, overrides=overrides, cfg=cfg, run_id=run.run_id, states=run.states)


def _client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.uri)


def _evaluation_runs(cfg) -> int:
    c = _client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    return len(c.search_runs([exp.experiment_id], filter_string="tags.`adpretrain.kind` = 'evaluation'"))


def _curve_json(cfg) -> dict:
    from pipeline.paths import curve_dir

    with open(os.path.join(curve_dir(cfg), "curve.json")) as f:
        return json.load(f)


def test_the_curve_equals_an_evaluation_of_each_checkpoint(trained):
    from pipeline.evaluate.jobs import evaluate
    from pipeline.evaluate.selection import method_value, selection_value
    from pipeline.paths import checkpoint_dir
    from pipeline.stages import Context, curve as curve_stage

    cfg = trained.cfg
    result = curve_stage.run(cfg, Context())
    assert result.evaluated == list(STEPS) and result.reused == []
    assert curve_stage.summary(result) == "3 checkpoints (3 evaluated, 0 reused)"
    got = _curve_json(cfg)
    assert got["run_id"] == trained.run_id and got["methods"] == list(SELECTED) and got["sources"] == [VAL]
    assert [p["step"] for p in got["steps"]] == list(STEPS)

    # each checkpoint's export, evaluated on its own (in-process, every method and kind) gives the curve's numbers
    plain = load_config(CI_CONFIG, [*trained.overrides, f"eval.methods={list(SELECTED)}", "eval.out=check"])
    for i, (step, point) in enumerate(zip(STEPS, got["steps"])):
        assert _same_weights(checkpoint_dir(cfg, trained.run_id, step), trained.states[step])
        folder = os.path.join(checkpoint_dir(cfg, trained.run_id, step), "export")
        assert not os.path.exists(os.path.join(folder, "registered.json"))
        with open(os.path.join(folder, "spec.json")) as f:
            prov = json.load(f)["provenance"]
        with open(os.path.join(folder, "projector.safetensors"), "rb") as f:
            assert prov["projector_sha256"] == hashlib.sha256(f.read()).hexdigest()
        assert prov["step"] == step and prov["run_id"] == trained.run_id
        rows = evaluate(plain, checkpoint=folder, sources=[VAL], register_decision=False, parallel=False,
                        progress=False).rows
        assert point["pretrained"] == {m: method_value(rows, m, "pretrained", "image_auroc") for m in SELECTED}
        assert point["selection"] == selection_value(rows, plain.eval)
        if i == 0:  # raw and residual features, once
            for kind in ("raw", "residual"):
                assert got[kind] == {m: method_value(rows, m, kind, "image_auroc") for m in SELECTED}

    # the later checkpoints were evaluated on pretrained features only, with the selection's methods
    later = next(d for d in os.listdir(checkpoint_dir(cfg, trained.run_id, STEPS[-1])) if d.startswith("val-"))
    with open(os.path.join(checkpoint_dir(cfg, trained.run_id, STEPS[-1]), later, "results.csv")) as f:
        body = [line.split(",") for line in f.read().splitlines()[1:]]
    assert {(r[3], r[4]) for r in body} == {(m, "pretrained") for m in SELECTED}

    with open(result.files["png"], "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # MLflow: a curve run, child of the training run, with the values at each step and both files
    c = _client(cfg)
    run = c.get_run(result.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained.run_id and run.data.tags["adpretrain.kind"] == "curve"
    for m in SELECTED:
        history = sorted((h.step, h.value) for h in c.get_metric_history(run.info.run_id, f"val_curve/{m}"))
        assert history == [(p["step"], p["pretrained"][m]) for p in got["steps"]]
    assert {a.path for a in c.list_artifacts(run.info.run_id, "curve")} == {"curve/curve.json", "curve/curve.png"}


def test_a_rerun_reuses_the_checkpoints_another_run_reuses_none(trained, capsys):
    from pipeline.cli import main
    from pipeline.evaluate.curve import build_curve
    from pipeline.paths import checkpoint_dir

    cfg = trained.cfg
    build_curve(cfg, progress=False)  # the first test's evaluations, or these ones when it runs alone
    first, runs = _curve_json(cfg), _evaluation_runs(cfg)

    assert main(["curve", str(CI_CONFIG), *trained.overrides]) == 0
    out = capsys.readouterr().out
    assert "3 reused" in out and "0 evaluated" in out and f"| {STEPS[0]} |" in out
    assert _evaluation_runs(cfg) == runs  # nothing evaluated again
    assert _curve_json(cfg) == first

    other = _train(cfg, "curvetest-b", 100, trained.tmp)
    again = build_curve(cfg, progress=False)
    assert again.run_id == other.run_id and again.evaluated == list(STEPS) and again.reused == []
    assert _evaluation_runs(cfg) == runs + len(STEPS)
    assert _curve_json(cfg)["run_id"] == other.run_id
    for step in STEPS:  # the other run's weights; the first run's folders are left as they are
        assert _same_weights(checkpoint_dir(cfg, other.run_id, step), other.states[step])
        assert _same_weights(checkpoint_dir(cfg, trained.run_id, step), trained.states[step])


def test_what_the_curve_needs_is_named(trained, tmp_path):
    from pipeline.evaluate.curve import build_curve
    from pipeline.export import derive_export
    from pipeline.paths import export_dir
    from pipeline.tracking import RunTracker

    cfg = load_config(CI_CONFIG, [*trained.overrides, f"workdir={tmp_path}"])
    with pytest.raises(UserError, match="no exported model of run 'curvetest'.*adpretrain pretrain"):
        build_curve(cfg, progress=False)
    with pytest.raises(UserError, match="not on pretrained features"):
        build_curve(load_config(CI_CONFIG, [*trained.overrides, "eval.selection_metric=padim/residual/image_auroc"]))

    bare = RunTracker.start(cfg.tracking, cfg, run_name="curvetest-bare", tags={})
    bare.end("FINISHED")
    source = export_dir(trained.cfg)
    weights = load_file(os.path.join(source, "projector.safetensors"))
    derive_export(source, export_dir(cfg), weights, {"run_id": bare.run_id})
    with pytest.raises(UserError, match=f"training run {bare.run_id} .* recorded no checkpoints"):
        build_curve(cfg, progress=False)
    derive_export(source, export_dir(cfg), weights, {"run_id": "0" * 32})
    with pytest.raises(UserError, match="names the MLflow training run '0+', which is not in the store"):
        build_curve(cfg, progress=False)
