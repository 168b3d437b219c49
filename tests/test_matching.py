"""Residual matching against a direct float64 implementation."""

from __future__ import annotations

import pytest
import torch

from pipeline.matching import match_residual, nearest_index


def brute_force(feat: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Python loops in float64: for every patch, the bank vector of highest cosine similarity.
    Also returns the smallest gap between the best and second-best similarity (no near ties)."""
    b, c, h, w = feat.shape
    feat, bank = feat.double(), bank.double()
    res = torch.empty_like(feat)
    idx = torch.empty(b, h * w, dtype=torch.long)
    gap = float("inf")
    for i in range(b):
        refs = bank[i if bank.shape[0] > 1 else 0]
        for y in range(h):
            for x in range(w):
                f = feat[i, :, y, x]
                sims = [float(f @ r / (f.norm() * r.norm())) for r in refs]
                order = sorted(range(len(sims)), key=lambda j: -sims[j])
                gap = min(gap, sims[order[0]] - sims[order[1]])
                idx[i, y * w + x] = order[0]
                res[i, :, y, x] = f - refs[order[0]]
    return res, idx, gap


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 1000])
def test_match_residual_equals_brute_force(shared, chunk):
    g = torch.Generator().manual_seed(0)
    b, c, h, w, k = 3, 6, 4, 4, 2
    feat = torch.randn(b, c, h, w, generator=g)
    bank = torch.randn(1 if shared else b, k * h * w, c, generator=g) * 3
    expected, idx, gap = brute_force(feat, bank)
    assert gap > 1e-4  # the inputs have a clear nearest neighbour everywhere
    assert torch.equal(nearest_index(feat, bank, chunk), idx)
    out = match_residual(feat, bank, chunk)
    assert out.shape == feat.shape and out.dtype == feat.dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_residual_uses_the_raw_matched_vector():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 5, 3, 3, generator=g)
    # the bank holds every patch scaled by 2 (cosine 1) and random others: the match is 2f, residual -f
    scaled = 2 * feat.flatten(2).transpose(1, 2)
    bank = torch.cat([torch.randn(2, 9, 5, generator=g), scaled], 1)
    torch.testing.assert_close(match_residual(feat, bank, chunk=4), -feat)
    assert torch.equal(nearest_index(feat, bank), torch.arange(9, 18).expand(2, -1))


def test_match_residual_float64_and_bad_shapes():
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64)
    bank = torch.randn(2, 12, 4, generator=g, dtype=torch.float64)
    expected, _, _ = brute_force(feat, bank)
    torch.testing.assert_close(match_residual(feat, bank, chunk=5), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="bank must be"):
        match_residual(feat, torch.randn(3, 12, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="bank must be"):
        match_residual(feat, torch.randn(2, 12, 5, dtype=torch.float64))
