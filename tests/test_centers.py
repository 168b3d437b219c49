"""The centers' accumulator against a direct float64 mean, and the centers file."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.centers import CenterAccumulator, load_centers, save_centers
from shards.errors import DataError, UserError


def random_batches(seed: int, n: int, widths: list[int], b: int = 3, hw: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        res = [torch.randn(b, c, hw, hw, generator=g) + lv for lv, c in enumerate(widths)]
        masks = [torch.rand(b, hw, hw, generator=g) < 0.6 for _ in widths]
        out.append((res, masks))
    return out


def direct_means(batches, widths) -> list[torch.Tensor]:
    means = []
    for lv, c in enumerate(widths):
        total, count = torch.zeros(c, dtype=torch.float64), 0
        for res, masks in batches:
            r, m = res[lv].double(), masks[lv]
            for i in range(r.shape[0]):
                for y in range(r.shape[2]):
                    for x in range(r.shape[3]):
                        if m[i, y, x]:
                            total += r[i, :, y, x]
                            count += 1
        means.append(total / count)
    return means


def test_center_accumulator_equals_direct_mean():
    widths = [3, 5]
    batches = random_batches(0, 3, widths)
    acc = CenterAccumulator(widths)
    for res, masks in batches:
        acc.add(res, masks)
    for got, want in zip(acc.centers(), direct_means(batches, widths)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)

    # merging two halves = accumulating everything in one
    a, b = CenterAccumulator(widths), CenterAccumulator(widths)
    a.add(*batches[0])
    for res, masks in batches[1:]:
        b.add(res, masks)
    a.merge(b.sums, b.counts)
    for got, want in zip(a.centers(), acc.centers()):
        torch.testing.assert_close(got, want)

    with pytest.raises(ValueError, match="do not fit"):
        CenterAccumulator(widths).add(batches[0][0], [m[:, :2] for m in batches[0][1]])
    with pytest.raises(DataError, match="no normal patches"):
        empty = CenterAccumulator(widths)
        empty.add(batches[0][0], [torch.zeros_like(m) for m in batches[0][1]])
        empty.centers()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_centers_round_trip(tmp_path, where):
    url = str(tmp_path / "c" / "bb.safetensors") if where == "local" else "memory://centers/bb.safetensors"
    centers = [torch.randn(3), torch.randn(7)]
    save_centers(url, centers, "dino-l3_6-s224-g16-abc", {"k": 4, "images": 10})
    got, meta = load_centers(url, backbone_id="dino-l3_6-s224-g16-abc")
    assert meta == {"k": 4, "images": 10, "backbone_id": "dino-l3_6-s224-g16-abc"}
    for g, c in zip(got, centers):
        assert torch.equal(g, c)
    with pytest.raises(UserError, match="belong to backbone"):
        load_centers(url, backbone_id="other")
    with pytest.raises(UserError, match="adpretrain centers"):
        load_centers(str(tmp_path / "missing.safetensors"))
    if where == "local":
        assert os.listdir(tmp_path / "c") == ["bb.safetensors"]  # no temporary left behind
