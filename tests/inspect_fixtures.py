"""Shared, prepared data for the inspect tests, built once per test session in a temporary folder:
synthetic MVTec-layout images of one product, two exports of a small model (the same random
EfficientNet-Lite0 backbone at 64 px on a 6 x 6 grid, float32, two projectors: its level maps of
8 x 8 and 4 x 4 are pooled and enlarged to the grid), states fitted by
`adpretrain inspect` for every method, and a sqlite registry whose champion is the first export.

Load it as a plugin (``pytest_plugins = ["inspect_fixtures"]`` in a test module), so the session
fixtures are built once for all the modules that use them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

MODEL_NAME = "inspect-test-projector"
METHODS = ("featurenorm", "patchcore", "padim")
FIT_ARGS = ("--k-shot", "2", "--fpr", "0.1", "--device", "cpu", "--no-progress")


@dataclass(frozen=True)
class InspectData:
    root: Path
    export: Path  # the model the tests inspect with
    other_export: Path  # the same backbone with other projector weights (another digest)
    good: Path  # good images of the product (train/good)
    test: Path  # images to inspect: test/good and test/<defect>

    def test_images(self) -> list[Path]:
        return sorted(self.test.rglob("*.png"))


def _export(folder: Path, seed: int) -> Path:
    from pipeline.backbone import build_backbone
    from pipeline.config import BackboneSpec, ProjectorSpec
    from pipeline.export import save_export
    from pipeline.projector import Projector

    bspec = BackboneSpec(name="tf_efficientnet_lite0", levels=[2, 3], weights="random", image_size=64, grid=6,
                         bf16=False)
    pspec = ProjectorSpec(memory_size=16, heads=2)
    backbone = build_backbone(bspec)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        projector = Projector.from_spec(backbone.widths, pspec)
    centers = [torch.zeros(w) for w in backbone.widths]
    save_export(str(folder), projector.state_dict(), centers, backbone, bspec, pspec, {"run": f"inspect-test-{seed}"})
    return folder


def run_cli(*argv: str) -> int:
    """`adpretrain ARGV...` in this process; its exit code."""
    from pipeline.cli import main

    return main([str(a) for a in argv])


def read_results(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def inspect_data(tmp_path_factory) -> InspectData:
    from shards.synth import generate

    root = tmp_path_factory.mktemp("inspect")
    generate("mvtec", root / "data", classes=["synth_leather"], normal=32, abnormal=6, size=80, seed=0)
    cls = root / "data" / "synth_leather"
    return InspectData(root, _export(root / "export", 0), _export(root / "other-export", 1),
                       cls / "train" / "good", cls / "test")


@pytest.fixture(scope="session")
def fitted(inspect_data: InspectData) -> dict[str, Path]:
    """method -> the --out folder of `adpretrain inspect` fitted with that method on the good
    images and scoring the test images."""
    d = inspect_data
    outs = {}
    for method in METHODS:
        out = d.root / f"out-{method}"
        code = run_cli("inspect", "--model", d.export, "--good", d.good, "--method", method, *FIT_ARGS,
                       "--out", out, d.test)
        assert code == 0, f"inspect --method {method} failed with exit code {code}"
        outs[method] = out
    return outs


@pytest.fixture(scope="session")
def other_state(inspect_data: InspectData) -> Path:
    """A state fitted with the other export (another digest)."""
    d = inspect_data
    out = d.root / "out-other"
    code = run_cli("inspect", "--model", d.other_export, "--good", d.good, "--method", "featurenorm", *FIT_ARGS,
                   "--out", out, d.test_images()[0])
    assert code == 0
    return out / "state"


@dataclass(frozen=True)
class Registry:
    uri: str  # sqlite tracking URI
    name: str
    version: str

    @property
    def champion(self) -> str:
        return f"models:/{self.name}@champion"


@pytest.fixture(scope="session")
def registry(inspect_data: InspectData, tmp_path_factory) -> Registry:
    """The first export logged and registered in a fresh sqlite store, alias champion on it."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingSpec, load_config
    from pipeline.tracking import RunTracker, ensure_store

    db = tmp_path_factory.mktemp("inspect-registry") / "mlflow.db"
    spec = TrackingSpec(uri=f"sqlite:///{db}", experiment="inspect", model_name=MODEL_NAME, system_metrics=False)
    ensure_store(spec)
    cfg = load_config(json.loads(json.dumps({
        "name": "inspect-test", "sources": [{"name": "a", "layout": "mvtec", "root": "/data/a", "split": "pretrain"}],
        "shards": {"url": "/tmp/shards"}, "train": {"steps": 1, "storage": "/tmp/storage"},
        "backbone": {"name": "tf_efficientnet_lite0", "levels": [2, 3], "weights": "random", "image_size": 64},
    })))
    with RunTracker.start(spec, cfg, run_name="inspect-test", tags={}) as run:
        version = run.log_model(str(inspect_data.export), MODEL_NAME, tags={})
    MlflowClient(spec.uri, registry_uri=spec.uri).set_registered_model_alias(MODEL_NAME, "champion", version)
    return Registry(spec.uri, MODEL_NAME, version)
