"""End to end on a real Ray cluster: `ray start --head` on 127.0.0.1, then

    ray job submit --working-dir <repo> -- python launch/pretrain.py --config configs/ci.yaml <overrides>

trains with 2 workers (gloo, DeepSpeed ZeRO-1, bf16 autocast). One worker is SIGKILLed after
the first checkpoint: Ray restarts the worker group, the run resumes from its last
checkpoint and finishes with the configured step count, the job exits 0, and MLflow holds
the run, its metrics and checkpoints, and a new registered version that loads and
produces features. The data (prepared once per session) and every output live outside the
repository, referenced by absolute paths: the uploaded working directory holds code only.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("pipeline_fixtures", "resume_checks")  # pipeline_fixtures: also the plugin below
from pipeline_fixtures import CI_CONFIG, ci_overrides  # noqa: E402
from resume_checks import KillAfterCheckpoint, check_killed_and_resumed, check_registered_model_loads  # noqa: E402

pytest_plugins = ["pipeline_fixtures"]

# the kill comes after the first checkpoint is registered: 12 steps later the run would end
STEPS, EVERY = 14, 2


def test_ray_job_submit_survives_a_killed_worker_and_registers_a_model_that_loads(prepared, ray_head, tmp_path):
    from pipeline.config import load_config

    overrides = [*ci_overrides(prepared, tmp_path, name="e2e-job"), f"train.steps={STEPS}",
                 f"train.checkpoint_every={EVERY}", "train.max_failures=2"]
    cfg = load_config(CI_CONFIG, overrides)
    assert cfg.train.num_workers == 2 and cfg.train.deepspeed.zero_stage == 1
    assert cfg.train.deepspeed.precision == "bf16" and not cfg.train.use_gpu
    [node] = ray_head.node_ids()
    killer = KillAfterCheckpoint(ray_head, cfg.train.storage, node_id=node, after=EVERY)
    log = ray_head.submit_pretrain(overrides, killer)

    run = check_killed_and_resumed(cfg, killer, log, STEPS, EVERY)
    check_registered_model_loads(cfg, run, tmp_path / "model-cache")
