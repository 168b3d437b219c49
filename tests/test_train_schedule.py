"""The training schedule against hand-computed values: the learning-rate rule (warm-up,
batch scaling, decay), the per-step K on every rank and after a restart, and the DeepSpeed
config sections."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.train import choose_k, deepspeed_config, lr_factor


# ----------------------------------------------------------------------------- schedule and K


def schedule_config(tmp: Path, **train) -> Config:
    return load_config({
        "name": "lr",
        "sources": [{"name": "a", "layout": "folder", "root": str(tmp), "split": "pretrain"}],
        "shards": {"url": str(tmp)},
        "backbone": {"levels": [1], "weights": "random"},
        "data": {"batch_size": 16},
        "train": {"storage": str(tmp), **train},
    })


@pytest.mark.parametrize("rule, scale", [("none", 1.0), ("linear", 2.0), ("sqrt", math.sqrt(2.0))])
def test_lr_factor_warm_up_scaling_and_decay(tmp_path, rule, scale):
    # global batch 16 x 4 ranks = 64 = 2 x base_batch 32; decay at round(0.7 x 50) = 35 and round(0.9 x 50) = 45
    cfg = schedule_config(tmp_path, steps=50, warmup_steps=5, lr_scaling=rule, base_batch=32)
    expected = {0: 0.2, 1: 0.4, 4: 1.0, 5: 1.0, 20: 1.0, 34: 1.0, 35: 0.1, 44: 0.1, 45: 0.01, 49: 0.01}
    for step, f in expected.items():
        assert lr_factor(step, cfg, world_size=4) == pytest.approx(scale * f, rel=1e-12), step


def test_lr_factor_without_warm_up_follows_the_method_recipe(tmp_path):
    # METHOD.md §5: 10 epochs, x0.1 after epochs 7 and 9
    cfg = schedule_config(tmp_path, steps=10)
    assert [lr_factor(s, cfg, world_size=1) for s in range(10)] == pytest.approx([1.0] * 7 + [0.1] * 2 + [0.01])


K_IN_ANOTHER_PROCESS = """
import json, random, sys
import numpy as np, torch
from pipeline.config import validate
from pipeline.train import choose_k
random.seed(1); np.random.seed(1); torch.manual_seed(1); np.random.rand(7)  # this rank's own RNG use
cfg = validate(json.loads(sys.argv[1]))
print(json.dumps([choose_k(cfg, s) for s in range(int(sys.argv[2]))]))
"""


def test_choose_k_is_the_same_on_every_rank_and_after_a_restart(tmp_path):
    cfg = schedule_config(tmp_path, steps=10)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"k_choices": [1, 4, 8]})})
    here = [choose_k(cfg, s) for s in range(200)]
    # another process (another rank) with another hash seed and other global RNG states
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", K_IN_ANOTHER_PROCESS, json.dumps(cfg.to_dict()), "200"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == here
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    assert [choose_k(cfg, s) for s in range(150, 200)] == here[150:]  # a restart at step 150 agrees
    counts = Counter(here)
    assert set(counts) == {1, 4, 8} and min(counts.values()) > 40  # drawn per step, all choices used
    other = cfg.model_copy(update={"seed": 1})
    assert [choose_k(other, s) for s in range(200)] != here  # the seed matters


def test_deepspeed_config_sections(tmp_path):
    def ds(**d):
        return deepspeed_config(schedule_config(tmp_path, steps=10, deepspeed=d), world_size=4)

    bf16 = ds(zero_stage=2, precision="bf16", grad_clip=0.5)
    assert bf16["train_batch_size"] == 64 and bf16["train_micro_batch_size_per_gpu"] == 16
    assert bf16["zero_optimization"] == {"stage": 2} and bf16["gradient_clipping"] == 0.5
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in bf16
    fp16 = ds(precision="fp16", zero_stage=0)
    assert fp16["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in fp16  # no model cast
    lamb = ds(optimizer="lamb")
    assert lamb["optimizer"]["type"] == "Lamb" and lamb["optimizer"]["params"]["lr"] == 1e-4
    assert "optimizer" not in bf16  # Adam is the client's torch optimizer
