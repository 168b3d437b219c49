"""Model selection without a cluster: the selection metric's syntax and checks, its value (the
mean over methods of each method's mean over the val classes), the no-regression gate's
comparisons, and the registry's decision when the gate fails (a real sqlite registry)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.evalspec import EvalSpec, parse_selection
from pipeline.evaluate.selection import gate_checks, method_value, selection_value

CI_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ci.yaml"


def _rows(values: dict[tuple[str, str, str], float | None], split: str = "val") -> list[dict]:
    """Table rows: (method, kind, class) -> image_auroc, plus a 'mean' row that must be ignored."""
    rows = [{"split": split, "source": "v", "class": c, "method": m, "kind": k, "image_auroc": v}
            for (m, k, c), v in values.items()]
    rows += [{"split": split, "source": "v", "class": "mean", "method": m, "kind": k, "image_auroc": 99.0}
             for m, k in {(m, k) for m, k, _ in values}]
    return rows


def test_the_selection_metric_is_parsed_and_keyed_for_mlflow():
    s = parse_selection("featurenorm+patchcore+padim/pretrained/image_auroc")
    assert (s.methods, s.kind, s.metric) == (("featurenorm", "patchcore", "padim"), "pretrained", "image_auroc")
    assert s.key == "featurenorm_patchcore_padim/pretrained/image_auroc"
    assert parse_selection("patchcore/raw/aupro").key == "patchcore/raw/aupro"
    for bad in ("patchcore/pretrained", "patchcore+/pretrained/image_auroc", "padim+padim/raw/image_auroc", ""):
        with pytest.raises(ValueError, match="METHOD\\[\\+METHOD...\\]/KIND/METRIC"):
            parse_selection(bad)


def test_the_default_averages_every_evaluated_method_behind_a_gate_on_every_other_kind():
    spec = EvalSpec()
    assert spec.selection == parse_selection("featurenorm+patchcore+padim/pretrained/image_auroc")
    assert spec.gate_margins == {"raw": 0.0, "residual": 0.0}
    # the defaults follow the methods and kinds evaluated
    narrow = EvalSpec(methods=["padim", "patchcore"], kinds=["residual", "pretrained"])
    assert narrow.selection.methods == ("padim", "patchcore") and narrow.gate_margins == {"residual": 0.0}
    # nothing to select without pretrained features; an explicit metric or gate is taken as written
    assert EvalSpec(kinds=["raw"]).selection is None
    assert EvalSpec(gate={"raw": 0.05}).gate_margins == {"raw": 0.05}
    assert EvalSpec(gate={}).gate_margins == {}


@pytest.mark.parametrize("evalspec, match", [
    ({"selection_metric": "cflow/pretrained/image_auroc"}, "every METHOD must be in eval.methods"),
    ({"methods": ["patchcore"], "selection_metric": "padim/pretrained/image_auroc"}, "every METHOD must be in"),
    ({"selection_metric": "patchcore/pretrained/auc"}, "METRIC one of image_auroc"),
    ({"kinds": ["raw", "pretrained"], "gate": {"residual": 0}}, r"eval.gate compares with \['residual'\]"),
    ({"gate": {"jpeg": 0.1}}, "eval.gate"),
    ({"selection_metric": "patchcore/pretrained"}, "METHOD\\[\\+METHOD...\\]/KIND/METRIC"),
])
def test_a_selection_the_config_cannot_compute_fails_when_it_is_read(evalspec, match):
    raw = yaml.safe_load(CI_CONFIG.read_text())
    load_config(raw)
    with pytest.raises(ConfigError, match=match):
        load_config({**raw, "eval": evalspec})


def test_the_value_is_the_mean_over_methods_of_the_means_over_val_classes():
    values = {("featurenorm", "pretrained", "a"): 0.5, ("featurenorm", "pretrained", "b"): 0.7,
              ("patchcore", "pretrained", "a"): 0.9, ("patchcore", "pretrained", "b"): None,
              ("padim", "pretrained", "a"): 0.1, ("padim", "pretrained", "b"): 0.4, ("padim", "raw", "a"): 1.0}
    rows = _rows(values) + _rows({("padim", "pretrained", "c"): 1.0}, split="eval")
    spec = EvalSpec(gate={})
    # each method: mean over its val classes with a value; then the mean over the three methods
    expected = ((0.5 + 0.7) / 2 + 0.9 + (0.1 + 0.4) / 2) / 3
    assert selection_value(rows, spec) == pytest.approx(expected, abs=1e-12)
    assert method_value(rows, "padim", "pretrained", "image_auroc") == pytest.approx(0.25)
    # a method without a val value: no selection value (no decision), rather than a mean of fewer methods
    assert selection_value([r for r in rows if r["method"] != "padim" or r["split"] != "val"], spec) is None


def test_the_gate_compares_every_method_with_every_gated_kind_by_its_margin():
    grid = {"featurenorm": (0.80, 0.70, 0.60), "patchcore": (0.75, 0.74, 0.75), "padim": (0.90, None, 0.50)}
    rows = _rows({(m, k, "a"): v for m, vs in grid.items() for k, v in zip(("pretrained", "residual", "raw"), vs)})
    spec = EvalSpec(gate={"raw": 0.0, "residual": 0.02, "pretrained": 0.5})
    out = gate_checks(rows, spec)
    # the selection's own kind is not compared with itself
    assert [(c["method"], c["against"]) for c in out["checks"]] == list(
        itertools.product(("featurenorm", "patchcore", "padim"), ("raw", "residual")))
    passed = {(c["method"], c["against"]): c["passed"] for c in out["checks"]}
    assert passed == {("featurenorm", "raw"): True, ("featurenorm", "residual"): True,
                      # a tie does not beat raw; 0.01 over residual is below the 0.02 margin
                      ("patchcore", "raw"): False, ("patchcore", "residual"): False,
                      # a missing value cannot be shown to be beaten
                      ("padim", "raw"): True, ("padim", "residual"): False}
    assert out["passed"] is False and len(out["failed"]) == 3
    assert "patchcore: pretrained 0.7500 does not beat residual 0.7400 + 0.02 (image_auroc on val)" in out["failed"]
    assert "padim: pretrained 0.9000 does not beat residual n/a + 0.02 (image_auroc on val)" in out["failed"]
    assert gate_checks(rows, EvalSpec(gate={})) == {"passed": True, "checks": [], "failed": []}
    assert gate_checks(rows, EvalSpec(selection_metric="featurenorm/pretrained/image_auroc"))["passed"] is True


def test_a_failed_gate_makes_a_better_version_challenger(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingSpec
    from pipeline.tracking import ensure_store, select_champion

    spec = TrackingSpec(uri=f"sqlite:///{tmp_path}/m.db", experiment="g", model_name="gm", system_metrics=False)
    ensure_store(spec)
    c = MlflowClient(spec.uri)
    c.create_registered_model("gm")
    for _ in range(3):
        c.create_model_version("gm", source=str(tmp_path))
    assert select_champion(spec, "1", "k", 0.5)["decision"] == "champion"
    failed = ["patchcore: pretrained 0.9 does not beat raw 0.95 + 0 (image_auroc on val)"]
    out = select_champion(spec, "2", "k", 0.9, gate_failed=failed)
    assert (out["decision"], out["gate_failed"], out["champion_value"]) == ("challenger", failed, 0.5)
    assert str(c.get_model_version_by_alias("gm", "champion").version) == "1"
    assert str(c.get_model_version_by_alias("gm", "challenger").version) == "2"
    # the same value with the gate passed: promoted
    assert select_champion(spec, "3", "k", 0.9)["decision"] == "champion"
    assert str(c.get_model_version_by_alias("gm", "champion").version) == "3"
