"""The training engine as the worker loop builds it (pipeline.train.build_engine), on a real
one-process gloo group: every precision trains and round-trips its checkpoint, gradient
accumulation updates once per optimizer step, and resume refuses a checkpoint that would
need unpickling instead of running it."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import yaml

from pipeline.config import ConfigError, validate
from shards.errors import UserError
from pipeline.projector import Projector
from pipeline.train import CKPT_TAG, build_engine, deepspeed_config, lr_factor

CI = os.path.join(os.path.dirname(__file__), "..", "configs", "ci.yaml")
WIDTHS = [8, 12]


def config(**train):
    d = yaml.safe_load(open(CI))
    d["train"]["deepspeed"].update(train.pop("deepspeed", {}))
    d["train"].update(train)
    return validate(d)


def projector() -> Projector:
    torch.manual_seed(0)
    return Projector(WIDTHS, memory_size=4, heads=2, mlp_ratio=2, se_reduction=4)


def batch(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, c, 3, 3, generator=g) for c in WIDTHS]


def train_steps(engine, n: int, first: int = 0) -> list[float]:
    losses = []
    for i in range(n):
        out = engine(batch(first + i))
        loss = sum((o.float() - 1).pow(2).mean() for o in out)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def state(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("precision,zero", [("bf16", 1), ("bf16", 2), ("fp16", 0), ("fp32", 2)])
def test_every_precision_trains_and_resumes_from_its_checkpoint(gloo_world, tmp_path, precision, zero):
    cfg = config(lr=1e-2, deepspeed={"precision": precision, "zero_stage": zero})
    engine, _ = build_engine(cfg, projector(), 1)
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())  # master weights, never cast
    losses = train_steps(engine, 6)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    engine.save_checkpoint(str(tmp_path), tag=CKPT_TAG, client_state={"step": 6})
    saved = state(engine)
    after_save = train_steps(engine, 2, first=6)

    fresh, _ = build_engine(cfg, projector(), 1)
    _, client = fresh.load_checkpoint(str(tmp_path), tag=CKPT_TAG)
    assert client["step"] == 6
    for k, v in state(fresh).items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    # the optimizer state came back too: the next steps are those of the uninterrupted run
    assert train_steps(fresh, 2, first=6) == pytest.approx(after_save, rel=1e-5)


def test_fp16_uses_autocast_with_dynamic_loss_scaling():
    ds = deepspeed_config(config(deepspeed={"precision": "fp16", "zero_stage": 0}), 2)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    assert "fp16" not in ds  # DeepSpeed's fp16 section would cast the projector to half
    assert "torch_autocast" not in deepspeed_config(config(deepspeed={"precision": "fp32"}), 2)
    with pytest.raises(ConfigError, match="precision fp16 needs zero_stage: 0"):
        config(deepspeed={"precision": "fp16", "zero_stage": 1})


def _gradient_norms(monkeypatch, cfg, steps: int = 3) -> list[float]:
    """The gradient norm the optimizer sees at each step (after loss scaling is undone)."""
    seen, step = [], torch.optim.Adam.step

    def recording(self, *a, **k):
        seen.append(float(torch.linalg.vector_norm(torch.stack([
            p.grad.float().norm() for g in self.param_groups for p in g["params"] if p.grad is not None]))))
        return step(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.Adam, "step", recording)
        engine, _ = build_engine(cfg, projector(), 1)
        train_steps(engine, steps)
    return seen


@pytest.mark.parametrize("precision,zero", [("fp16", 0), ("bf16", 1), ("bf16", 2)])
def test_the_optimizer_sees_the_true_gradient_in_mixed_precision(gloo_world, monkeypatch, precision, zero):
    """Loss scaling and clipping leave the optimizer the fp32 gradient (to autocast's rounding)."""
    settings = {"zero_stage": zero, "grad_clip": 100.0}
    want = _gradient_norms(monkeypatch, config(lr=1e-3, deepspeed={"precision": "fp32", **settings}))
    got = _gradient_norms(monkeypatch, config(lr=1e-3, deepspeed={"precision": precision, **settings}))
    assert len(got) == len(want) == 3
    assert got == pytest.approx(want, rel=0.05), (got, want)


def test_gradient_accumulation_updates_once_per_optimizer_step(gloo_world):
    cfg = config(lr=1e-2, grad_accum=3, warmup_steps=0, deepspeed={"precision": "fp32", "zero_stage": 1})
    ds = deepspeed_config(cfg, 2)
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, cfg.data.batch_size * 2 * 3)
    # the global batch of lr scaling counts the accumulated micro-batches
    linear = config(grad_accum=3, lr_scaling="linear", base_batch=cfg.data.batch_size, warmup_steps=0)
    assert lr_factor(0, linear, 2) == pytest.approx(6.0)

    engine, scheduler = build_engine(cfg, projector(), 1)
    before = state(engine)
    changed = []
    for i in range(6):
        out = engine(batch(i))
        engine.backward(sum(o.pow(2).mean() for o in out))
        engine.step()
        now = state(engine)
        changed.append(any(not torch.equal(now[k], before[k]) for k in now))
        before = now
    assert changed == [False, False, True, False, False, True]
    assert scheduler.last_epoch == 2  # the lr schedule steps with the optimizer


class _Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_planted_pickle_without_running_it(gloo_world, tmp_path):
    cfg = config(deepspeed={"precision": "bf16", "zero_stage": 1})
    engine, _ = build_engine(cfg, projector(), 1)
    train_steps(engine, 1)
    engine.save_checkpoint(str(tmp_path), tag=CKPT_TAG, client_state={"step": 1})
    marker = tmp_path / "payload-ran"
    target = tmp_path / CKPT_TAG / "mp_rank_00_model_states.pt"
    assert target.is_file()
    with open(target, "wb") as f:
        pickle.dump({"module": _Payload(str(marker))}, f)

    fresh, _ = build_engine(cfg, projector(), 1)
    with pytest.raises(UserError, match="refusing to unpickle checkpoint file .*mp_rank_00_model_states.pt"):
        fresh.load_checkpoint(str(tmp_path), tag=CKPT_TAG)
    assert not marker.exists()
