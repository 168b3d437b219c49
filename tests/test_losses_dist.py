"""A real 2-process gloo run equals one process on the concatenated batch.

Both ranks run a small Projector on their own images, then adpretrain_loss with
group=WORLD. The sum of the two ranks' losses must equal the single-process loss on all
images, and the sum of their parameter gradients the single-process gradient (fp32, 1e-5).
"""

from __future__ import annotations

import os
from conftest import free_port
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.collectives import sum_
from pipeline.losses import adpretrain_loss
from pipeline.projector import Projector

WIDTHS = [16, 24]
GRID = (4, 4)
TAU, CHUNK = 0.15, 7
# (name, images per rank): rank 1 of "uneven" holds a single image without any anomaly
SPLITS = [("even", [2, 2]), ("uneven", [3, 1])]
# brings a = sqrt(||e|| + 1) - 1 below 0.44 for some abnormal patches, so the norm radius comes
# from the minimum over abnormal patches, which differs between a rank and the whole batch
SCALE = 0.15


def make_projector() -> Projector:
    torch.manual_seed(0)
    return Projector(WIDTHS, memory_size=12, heads=4, mlp_ratio=2, se_reduction=4)


def make_batch(images: int) -> dict:
    g = torch.Generator().manual_seed(1)
    h, w = GRID
    x1 = [torch.randn(images, c, h, w, generator=g) for c in WIDTHS]
    x2 = [x + 0.3 * torch.randn(x.shape, generator=g) for x in x1]
    angle = [torch.zeros(images, h, w, dtype=torch.bool) for _ in WIDTHS]
    norm = [torch.zeros(images, h, w, dtype=torch.bool) for _ in WIDTHS]
    for lv in range(len(WIDTHS)):
        for i in range(images - 1):  # the last image is normal
            angle[lv][i, i % h, 1 : 3 + lv] = True
            norm[lv][i, (i + 1) % h, 0 : 2 + lv] = True
    centers = [0.1 * torch.randn(c, generator=g) for c in WIDTHS]
    return {"x1": x1, "x2": x2, "angle": angle, "norm": norm, "centers": centers}


def run_step(proj: Projector, batch: dict, lo: int, hi: int, group) -> dict:
    proj.zero_grad(set_to_none=True)
    f1 = [SCALE * f for f in proj([x[lo:hi] for x in batch["x1"]])]
    f2 = [SCALE * f for f in proj([x[lo:hi] for x in batch["x2"]])]
    total, parts = adpretrain_loss(
        f1,
        f2,
        [y[lo:hi] for y in batch["angle"]],
        [y[lo:hi] for y in batch["norm"]],
        batch["centers"],
        TAU,
        CHUNK,
        group=group,
    )
    total.backward()
    return {
        "loss": total.detach(),
        "parts": parts,
        "grads": {n: p.grad.detach().clone() for n, p in proj.named_parameters()},
    }


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, split in SPLITS:
            batch = make_batch(sum(split))
            proj = make_projector()
            lo = sum(split[:rank])
            res = run_step(proj, batch, lo, lo + split[rank], dist.group.WORLD)
            res["loss_sum"] = sum_(res["loss"].detach().clone(), dist.group.WORLD)
            results[name] = res
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    world = 2
    mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for name, split in SPLITS:
        single = run_step(make_projector(), make_batch(sum(split)), 0, sum(split), None)
        per_rank = [r[name] for r in ranks]
        summed = sum(r["loss"] for r in per_rank)
        torch.testing.assert_close(summed, single["loss"], rtol=1e-5, atol=1e-5)
        for r in per_rank:
            torch.testing.assert_close(r["loss_sum"], single["loss"], rtol=1e-5, atol=1e-5)
        for key, value in single["parts"].items():
            torch.testing.assert_close(sum(r["parts"][key] for r in per_rank), value, rtol=1e-5, atol=1e-5)
        assert set(single["grads"]) == set(per_rank[0]["grads"])
        for pname, g in single["grads"].items():
            got = sum(r["grads"][pname] for r in per_rank)
            torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {pname}: {m}")
            # each rank alone holds only part of the gradient: the test would notice a missing all-reduce
        assert not torch.allclose(per_rank[0]["grads"]["levels.0.memory"], single["grads"]["levels.0.memory"])
