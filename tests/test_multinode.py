"""Pretraining on a real two-node Ray cluster on one machine, shards and checkpoints on S3:

    ray start --head --node-ip-address 127.0.0.1 --port P ...
    ray start --address 127.0.0.1:P --node-ip-address 127.0.0.1 ...
    ray job submit --working-dir <repo> -- python launch/pretrain.py --config configs/ci.yaml \
        shards.url=s3://<bucket>/shards train.storage=s3://<bucket>/ray-storage train.placement=STRICT_SPREAD ...

Each node has 2 CPUs, so both workers (1 CPU each) would fit on one node: STRICT_SPREAD is
what puts them on two. The worker on the second node is SIGKILLed once a checkpoint is
registered on S3; Ray Train restarts the worker group, again one worker per node, the run
resumes from the S3 checkpoint, reaches train.steps, and registers a version that loads.
Ray's state API, asked from outside the job, tells on which node every worker actor ran,
the dead ones included.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

pytest.register_assert_rewrite("pipeline_fixtures", "resume_checks")  # pipeline_fixtures: also the plugin below
from pipeline_fixtures import CI_CONFIG, ci_overrides  # noqa: E402
from resume_checks import (  # noqa: E402
    KillAfterCheckpoint,
    check_killed_and_resumed,
    check_registered_model_loads,
    latest_checkpoint,
)

pytest_plugins = ["pipeline_fixtures"]
pytestmark = pytest.mark.slow

# the kill comes after the first checkpoint is registered: 12 steps later the run would end
STEPS, EVERY = 14, 2


def test_two_nodes_one_worker_each_resume_from_s3_after_a_worker_is_killed(prepared, s3_bucket, ray_two_nodes,
                                                                         tmp_path):
    from pipeline.config import load_config
    from shards import storage

    fs, _ = storage.filesystem(s3_bucket)
    fs.put(f"{prepared.shards}/", f"{s3_bucket[5:]}/shards/", recursive=True)  # shards, reference bank, centers
    checkpoints = f"{s3_bucket}/ray-storage"
    overrides = [*ci_overrides(prepared, tmp_path, name="two-nodes"), f"shards.url={s3_bucket}/shards",
                 f"train.storage={checkpoints}", "train.placement=STRICT_SPREAD", f"train.steps={STEPS}",
                 f"train.checkpoint_every={EVERY}", "train.max_failures=2"]
    cfg = load_config(CI_CONFIG, overrides)
    assert cfg.train.num_workers == 2 and cfg.train.cpus_per_worker == 1 and not cfg.train.use_gpu
    head, second = ray_two_nodes.node_ids()
    killer = KillAfterCheckpoint(ray_two_nodes, checkpoints, node_id=second, after=EVERY)
    log = ray_two_nodes.submit_pretrain(overrides, killer)

    run = check_killed_and_resumed(cfg, killer, log, STEPS, EVERY)

    # the last checkpoint Ray Train registered lies on S3, and the job exported it
    folder, metrics = latest_checkpoint(checkpoints)
    assert metrics["step"] == STEPS and folder.startswith(f"{checkpoints}/")
    assert fs.ls(folder), folder
    assert f"checkpoint      {folder}" in log, log[-3000:]
    assert not (tmp_path / "ray-storage").exists()  # nothing of the run went to local storage

    # two worker groups (one placement group each): the one that lost its worker and the
    # one that replaced it; each had one worker on each node
    workers = ray_two_nodes.train_workers()
    groups = defaultdict(list)
    for worker in workers:
        groups[worker.placement_group_id].append(worker)
    assert len(groups) == 2, groups
    for group in groups.values():
        assert sorted(w.node_id for w in group) == sorted([head, second]), group
    [killed] = [w for w in workers if w.actor_id == killer.killed.actor_id]
    assert killed.node_id == second and killed.pid == killer.killed.pid and killed.state == "DEAD"
    [replacement] = [w for pg, group in groups.items() if pg != killed.placement_group_id
                     for w in group if w.node_id == second]
    assert replacement.pid != killed.pid

    check_registered_model_loads(cfg, run, tmp_path / "model-cache")
