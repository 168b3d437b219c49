"""launch/slurm/*.sbatch under a real single-node SLURM cluster (started by the `slurm` fixture)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from slurm_cluster import SlurmCluster, free_port_range, slurm  # noqa: F401  (slurm: the cluster fixture)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "launch" / "slurm"


def ci_overrides(tmp: Path) -> list[str]:
    """configs/ci.yaml with every path in ``tmp``, so the test writes nothing into the checkout."""
    roots = [f"sources.{i}.root={tmp}/data/{name}" for i, name in enumerate(("realiad", "visa", "btad", "mvtec"))]
    return [*roots, f"workdir={tmp}/runs", f"shards.url={tmp}/shards", f"train.storage={tmp}/ray",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db"]


def submit(slurm: SlurmCluster, script: str, args: list[str], tmp: Path, *options: str, **env: str) -> str:
    """sbatch from the checkout, as users do; Ray's ports and files kept apart from other Rays here."""
    env = {"ADP_PYTHON": sys.executable, "RAY_PORT_BASE": str(free_port_range(200)),
           "RAY_TMPDIR": str(slurm.root / "ray"), **env}
    return slurm.sbatch(str(SCRIPTS / script), args, cwd=ROOT, env=env,
                        options=[f"--output={tmp}/%x-%j.out", "--cpus-per-task=2", *options])


def test_bad_config_fails_the_job_with_the_error(slurm: SlurmCluster, tmp_path: Path):
    pretrain = submit(slurm, "pretrain.sbatch", ["configs/ci.yaml", "train.stepz=3"], tmp_path)
    evaluate = submit(slurm, "evaluate.sbatch", ["configs/ci.yaml", "--model", "models:/adpretrain-projector@champion",
                                                 "eval.k_shot=3"], tmp_path)
    for job_id, error in ((pretrain, "train.stepz: unknown key"), (evaluate, "eval.k_shot: Input should be")):
        job = slurm.wait(job_id, timeout=120)
        assert (job.state, job.exit_code) == ("FAILED", "2:0"), job.output
        assert error in job.output
        assert "Ray head" not in job.output  # rejected before any node was started


def test_build_shards_then_pretrain_under_slurm(slurm: SlurmCluster, tmp_path: Path):
    args = ["configs/ci.yaml", *ci_overrides(tmp_path)]
    build = submit(slurm, "build_shards.sbatch", args, tmp_path, RAY_DASHBOARD="0")
    train = submit(slurm, "pretrain.sbatch", args, tmp_path, f"--dependency=afterok:{build}")
    built = slurm.wait(build, timeout=300)
    assert (built.state, built.exit_code) == ("COMPLETED", "0:0"), built.output
    assert (tmp_path / "shards" / "manifest.json").is_file()
    done = slurm.wait(train, timeout=560)
    assert (done.state, done.exit_code) == ("COMPLETED", "0:0"), done.output
    assert "stopping Ray" in done.output

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("adpretrain-ci")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`adpretrain.run_name` LIKE 'ci-%'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags["adpretrain.checkpoint.latest_step"] == "6"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/step-0000003", "checkpoints/step-0000006"]
    assert "loss" in run.data.metrics
    versions = client.search_model_versions("name = 'adpretrain-projector'")
    assert [v.run_id for v in versions] == [run.info.run_id]
