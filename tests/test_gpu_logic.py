"""The GPU path's logic on a CPU machine: torch is made to report 8 CUDA devices, Ray Train
gives this worker cuda:5, and the real functions of the training loop run with fake tensors
(torch's FakeTensorMode: real shapes, dtypes and devices, no data), so every module and
tensor must land on cuda:5. With the backend reported as NCCL, the collectives the loop and
the losses call are wrapped: none may receive a CPU tensor.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import yaml
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline import collectives, devices
from pipeline.bank import WorkerBank
from pipeline.config import validate
from shards.errors import UserError
from pipeline.refbank import RefBankStore

CI = os.path.join(os.path.dirname(__file__), "..", "configs", "ci.yaml")
CUDA5 = torch.device("cuda", 5)
GROUPS = {"realiad-synth/synth_wood/C1": 4, "visa-synth/synth_mesh/-": 4}


@pytest.fixture
def eight_gpus(monkeypatch):
    """torch reports 8 CUDA devices with plenty of free memory; set_device calls are recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what autocast asks
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 141 * 2**30))
    # fake tensors must not try to reach the (absent) driver when they move to a CUDA device
    monkeypatch.setattr(FakeTensorMode, "avoid_device_init", property(lambda self: True))
    # pinning needs a CUDA driver: record what is pinned instead
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.shape) or t)
    return {"current": current, "pinned": pinned}


@pytest.fixture
def worker_at_local_rank_5(monkeypatch, eight_gpus):
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: CUDA5)
    return eight_gpus


def ci_config(**train):
    d = yaml.safe_load(open(CI))
    d["train"].update(train)
    return validate(d)


def small_bank(tmp_path, widths, grid) -> RefBankStore:
    store = RefBankStore(str(tmp_path / "bank"))
    g = torch.Generator().manual_seed(0)
    for group, m in GROUPS.items():
        feats = [torch.randn(m, c, grid, grid, generator=g) for c in widths]
        store.write_group(group, feats, [f"{group}/img{j}" for j in range(m)])
    store.write_manifest({"backbone_id": "bb"})
    return store


def batch(cfg, size: int) -> dict:
    groups = [g for g in GROUPS for _ in range(2)]
    mask = torch.zeros(len(groups), size, size, dtype=torch.bool)
    mask[0, : size // 2, : size // 2] = True
    return {
        "view1": torch.rand(len(groups), 3, size, size),
        "view2": torch.rand(len(groups), 3, size, size),
        "mask": mask,
        "group": groups,
        "key": [f"{g}/img{i % 2}" for i, g in enumerate(groups)],
    }


def test_the_worker_device_comes_from_ray_train(worker_at_local_rank_5):
    assert devices.train_device(use_gpu=True) == CUDA5
    assert worker_at_local_rank_5["current"] == [CUDA5]  # made the current device as well
    assert devices.train_device(use_gpu=False) == torch.device("cpu")


def test_a_cuda_worker_without_a_gpu_from_ray_is_a_clear_error(monkeypatch):
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    with pytest.raises(UserError, match="ray start --num-gpus"):
        devices.train_device(use_gpu=True)


def test_a_ray_task_takes_the_gpu_ray_assigned(monkeypatch, eight_gpus):
    import ray

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [5])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert devices.task_device(True) == CUDA5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # Ray left only the assigned GPU visible
    assert devices.task_device(True) == torch.device("cuda", 0)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    with pytest.raises(UserError, match="assigned it none"):
        devices.task_device(True)


def test_use_gpu_without_cuda_fails_before_ray_starts(monkeypatch):
    from pipeline import launcher

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="train.use_gpu asks for a CUDA GPU but this machine has none"):
        launcher.pretrain(ci_config(use_gpu=True))


def test_use_gpu_needs_a_gpu_per_worker_on_a_local_ray(monkeypatch, eight_gpus):
    from pipeline import launcher

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="num_workers=2 needs that many GPUs, but this machine has 1"):
        launcher.pretrain(ci_config(use_gpu=True))


@pytest.mark.parametrize("fits", [True, False])
def test_every_tensor_and_module_of_the_step_lands_on_cuda_5(worker_at_local_rank_5, monkeypatch, tmp_path, fits):
    from pipeline.backbone import build_backbone
    from pipeline.projector import Projector
    from pipeline.train import Step, draw_generator

    if not fits:  # the bank takes more than train.bank_memory_fraction of the free memory
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**10, 141 * 2**30))
    cfg = ci_config(use_gpu=True)
    backbone = build_backbone(cfg.backbone)
    store = small_bank(tmp_path, backbone.widths, backbone.grid)
    projector = Projector.from_spec(backbone.widths, cfg.projector)
    with FakeTensorMode(allow_non_fake_inputs=True):
        device = devices.train_device(cfg.train.use_gpu)
        backbone = backbone.to(device)
        bank = WorkerBank(store, device, cfg.train.bank_memory_fraction)
        centers = [torch.zeros(c).to(device) for c in backbone.widths]
        projector = projector.to(device)
        step = Step(cfg, backbone, bank, centers)
        r1, r2 = step.residuals(batch(cfg, cfg.backbone.image_size), 2, draw_generator(cfg, 0, 0))
        out = projector([torch.cat([a, b]) for a, b in zip(r1, r2)])

    assert step.device == CUDA5
    assert {p.device for p in backbone.parameters()} | {b.device for b in backbone.buffers()} == {CUDA5}
    assert {p.device for p in projector.parameters()} == {CUDA5}
    assert {c.device for c in centers} == {CUDA5}
    assert {t.device for t in [*r1, *r2, *out]} == {CUDA5}
    assert [r.dtype for r in r1] == [torch.float32] * len(r1)
    assert bank.on_device is fits
    assert {f.device for f in bank.feats} == ({CUDA5} if fits else {torch.device("cpu")})
    # what crosses the host link goes through pinned memory: the two views and, with the bank on
    # the device, only the draw's indices (B groups, B x K picks); off the device, the bank once
    # and each step's gathered references
    b, s, hw = len(GROUPS) * 2, cfg.backbone.image_size, backbone.grid ** 2
    views = [(b, 3, s, s)] * 2
    if fits:
        expected = [(b,), (b, 2)] + views
    else:
        expected = [(len(GROUPS), 4, hw, c) for c in backbone.widths] + [(b, 2 * hw, c) for c in backbone.widths] + views
    assert sorted(map(tuple, worker_at_local_rank_5["pinned"])) == sorted(expected)


class Recorder:
    """Wraps the torch.distributed calls the collectives make (world of one: identity) and
    records the device of every tensor they receive."""

    def __init__(self, monkeypatch, backend: str):
        import torch.distributed.nn.functional as dist_nn

        self.devices: list[tuple[str, torch.device]] = []
        monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
        monkeypatch.setattr(dist, "all_reduce", self._all_reduce)
        monkeypatch.setattr(dist, "all_gather", self._all_gather)
        monkeypatch.setattr(dist_nn, "all_gather", self._all_gather_grad)

    def _all_reduce(self, t, op=None, group=None):
        self.devices.append(("all_reduce", t.device))

    def _all_gather(self, out, t, group=None):
        self.devices.append(("all_gather", t.device))
        out[0].copy_(t)

    def _all_gather_grad(self, t, group=None):
        self.devices.append(("all_gather_grad", t.device))
        return (t,)


def test_under_nccl_the_collective_module_refuses_a_cpu_tensor(gloo_world, monkeypatch):
    Recorder(monkeypatch, "nccl")
    with pytest.raises(RuntimeError, match="under NCCL got a tensor on cpu"):
        collectives.sum_(torch.zeros(3), gloo_world, "metrics")
    with pytest.raises(RuntimeError, match="under NCCL"):
        collectives.gather_rows(torch.zeros(4, 2), torch.zeros(4, dtype=torch.bool), gloo_world)


def test_under_nccl_the_loop_metrics_and_gathers_stay_on_cuda_5(gloo_world, worker_at_local_rank_5, monkeypatch):
    rec = Recorder(monkeypatch, "nccl")
    group = gloo_world
    with FakeTensorMode(allow_non_fake_inputs=True):
        device = devices.train_device(True)
        window = collectives.MetricWindow(["loss", "angle/l0"], device, group)
        for _ in range(3):  # the loop's per-step parts: detached scalars on the device
            window.add([torch.ones((), device=device), torch.ones((), device=device)], data_s=0.0)
        assert window.sums.device == CUDA5
        with pytest.raises(Exception):  # reading the reduced sums on the host needs real data
            window.reduce(samples_per_step=8)
        collectives.min_(torch.ones((), device=device), group)  # as the norm loss's radius
    assert rec.devices == [("all_reduce", CUDA5)] * 2
    # the gathered negatives need row counts on the host: they are checked on real tensors below


def test_the_losses_never_create_a_collective_tensor_on_a_default_device(gloo_world, monkeypatch):
    """Every tensor the losses hand to a collective is made on their inputs' device: with the
    default device set to meta, a tensor created without an explicit device would show up as meta."""
    from pipeline.losses import adpretrain_loss

    rec = Recorder(monkeypatch, "gloo")
    g = torch.Generator().manual_seed(0)
    feats = [[torch.randn(2, c, 3, 3, generator=g, requires_grad=True) for c in (4, 6)] for _ in range(2)]
    labels = [torch.zeros(2, 3, 3, dtype=torch.bool) for _ in range(2)]
    for y in labels:
        y[0, 0, :2] = True
    centers = [torch.zeros(4), torch.zeros(6)]
    torch.set_default_device("meta")
    try:
        total, _ = adpretrain_loss(feats[0], feats[1], labels, labels, centers, 0.15, 7, group=gloo_world)
    finally:
        torch.set_default_device(None)
    assert total.device.type == "cpu"
    names = [n for n, _ in rec.devices]
    # per level: the negatives (sizes, rows, labels), and per view the norm radius and group counts
    assert names == ["all_gather", "all_gather_grad", "all_gather"] + ["all_reduce"] * 4 + \
        ["all_gather", "all_gather_grad", "all_gather"] + ["all_reduce"] * 4, names
    assert {d for _, d in rec.devices} == {torch.device("cpu")}
