"""The training step's math (real backbone, reference bank and centers of the prepared CI
data) overfits a fixed batch. The 2-worker Ray Train run, with a worker SIGKILLed mid-run,
is tested end to end through `ray job submit` in test_e2e_ray.py."""

from __future__ import annotations

import math

import pytest
import torch

pytest.register_assert_rewrite("pipeline_fixtures")  # also loaded as the plugin below
from pipeline_fixtures import ci_config  # noqa: E402

pytest_plugins = ["pipeline_fixtures"]


def test_the_step_overfits_a_fixed_batch(prepared, tmp_path):
    from pipeline.backbone import build_backbone
    from pipeline.bank import WorkerBank
    from pipeline.data import MixedBatches, StreamPlan
    from pipeline.projector import Projector
    from pipeline.centers import load_centers
    from pipeline.refbank import RefBankStore
    from pipeline.paths import centers_url, refbank_url
    from pipeline.train import Step

    cfg = ci_config(prepared, tmp_path)
    backbone = build_backbone(cfg.backbone)
    store = RefBankStore(refbank_url(cfg, backbone.id))
    centers, _ = load_centers(centers_url(cfg, backbone.id))
    step = Step(cfg, backbone, WorkerBank(store, torch.device("cpu")), centers)
    batch = next(iter(MixedBatches(StreamPlan.from_config(cfg), cfg, backbone.mean, backbone.std, backbone.grid, 0)))
    assert int(batch["label"].sum()) == 1
    with torch.no_grad():
        r1, r2 = step.residuals(batch, 2, torch.Generator().manual_seed(0))
    assert [r.shape for r in r1] == [(4, w, backbone.grid, backbone.grid) for w in backbone.widths]
    assert not torch.equal(r1[0], r2[0])  # two photometric views

    torch.manual_seed(0)
    projector = Projector.from_spec(backbone.widths, cfg.projector)
    opt = torch.optim.Adam(projector.parameters(), lr=1e-3)
    totals, angles = [], []
    for _ in range(12):
        total, parts = step.loss(projector, r1, r2, batch["mask"])
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
        angles.append(sum(float(v) for k, v in parts.items() if k.startswith("angle/")))
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.7 * totals[0], totals
    assert sum(b < a for a, b in zip(totals, totals[1:])) >= 10, totals
    assert angles[-1] < angles[0] - 0.1, angles  # the angle loss learns too, not only the norms
