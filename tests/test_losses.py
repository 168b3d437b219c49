"""The losses against direct float64 implementations of METHOD.md section 4."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.collectives import sum_
from pipeline.losses import adpretrain_loss, angle_loss, norm_loss

TAU = 0.15


def ref_angle(e1: torch.Tensor, e2: torch.Tensor, y: torch.Tensor, mu: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """-log(exp(s+/tau) / sum over negatives of exp(z_i . z_j / tau)), mean over all 2N patches."""
    n = e1.shape[0]
    d1, d2 = e1 - mu, e2 - mu
    z = torch.cat([d1 / d1.norm(dim=1, keepdim=True), d2 / d2.norm(dim=1, keepdim=True)])
    yy = torch.cat([y, y]).tolist()
    losses = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        positive = torch.exp(z[i] @ z[partner] / tau)
        denominator = sum(torch.exp(z[i] @ z[j] / tau) for j in range(2 * n) if yy[j] != yy[i])
        losses.append(-torch.log(positive / denominator))
    return torch.stack(losses).mean()


def ref_norm(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Norm loss written patch by patch; the radius and the weights are constants."""
    a = torch.sqrt(e.norm(dim=1) + 1) - 1
    labels = y.tolist()
    abnormal_a = [a[i].item() for i in range(len(labels)) if labels[i]]
    r_max = min(0.9 * min(abnormal_a), 0.4) if abnormal_a else 0.4
    r_min = 0.99 * r_max
    bound = r_max + 0.75
    outer, inner, abn = [], [], []
    for i, lab in enumerate(labels):
        ai = a[i]
        if not lab and ai.item() > r_max:
            w = math.exp(ai.item() - r_max)
            outer.append(w * torch.log1p(torch.exp(ai - r_max)))
        if not lab and ai.item() < r_min:
            w = math.exp(r_min - ai.item())
            inner.append(w * torch.log1p(torch.exp(r_min - ai)))
        if lab and ai.item() < bound:
            w = math.exp(bound - ai.item())
            abn.append(w * torch.log1p(torch.exp(bound - ai)))
    total = 0 * a.sum()  # an empty group contributes 0
    for group in (outer, inner, abn):
        if group:
            total = total + torch.stack(group).mean()
    return total


def make_case(n: int = 30, c: int = 8, abnormal: int = 6, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    e1 = torch.randn(n, c, generator=g, dtype=dtype)
    e2 = e1 + 0.3 * torch.randn(n, c, generator=g, dtype=dtype)
    y = torch.zeros(n, dtype=torch.bool)
    y[torch.randperm(n, generator=g)[:abnormal]] = True
    mu = 0.2 * torch.randn(c, generator=g, dtype=dtype)
    return e1, e2, y, mu


def value_and_grads(fn, *inputs: torch.Tensor):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    return out.detach(), torch.autograd.grad(out, xs)


@pytest.mark.parametrize("chunk", [1, 7, 30, 1000])
def test_angle_loss_matches_reference_for_every_chunk_size(chunk):
    e1, e2, y, mu = make_case()
    v, g = value_and_grads(lambda a, b, m: angle_loss(a, b, y, m, TAU, chunk_size=chunk), e1, e2, mu)
    v_ref, g_ref = value_and_grads(lambda a, b, m: ref_angle(a, b, y, m), e1, e2, mu)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_angle_loss_can_be_negative_and_uses_temperature():
    """The denominator holds negatives only: well-separated features give a loss below zero."""
    e1, e2, y, mu = make_case(n=20, abnormal=5, seed=1)
    e1[y] += 6.0
    e2[y] += 6.0
    loss = angle_loss(e1, e2, y, mu, tau=0.15)
    assert loss < 0
    torch.testing.assert_close(loss, ref_angle(e1, e2, y, mu, 0.15))
    torch.testing.assert_close(angle_loss(e1, e2, y, mu, tau=0.5), ref_angle(e1, e2, y, mu, 0.5))


def test_angle_loss_float32_and_label_forms():
    e1, e2, y, mu = make_case(n=40, c=16, abnormal=9, seed=2)
    ref = ref_angle(e1, e2, y, mu)
    f32 = angle_loss(e1.float(), e2.float(), y, mu.float(), chunk_size=16)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), ref, rtol=1e-5, atol=1e-6)
    for labels in (y.long(), y.float(), y.reshape(5, 8).to(torch.uint8)):
        torch.testing.assert_close(angle_loss(e1, e2, labels, mu), ref)


def test_angle_loss_computes_in_float32_under_bf16_autocast_and_for_bf16_inputs():
    e1, e2, y, mu = make_case(n=40, c=16, abnormal=9, seed=3, dtype=torch.float32)
    plain = angle_loss(e1, e2, y, mu, chunk_size=8)
    x1, x2 = e1.clone().requires_grad_(True), e2.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = angle_loss(x1, x2, y, mu, chunk_size=8)
        auto.backward()
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(angle_loss(e1.requires_grad_(True), e2, y, mu, chunk_size=8), e1)[0]
    torch.testing.assert_close(x1.grad, g1, rtol=1e-5, atol=1e-7)

    b1, b2 = e1.detach().bfloat16().requires_grad_(True), e2.detach().bfloat16()
    lb = angle_loss(b1, b2, y, mu, chunk_size=8)
    lb.backward()
    assert lb.dtype == torch.float32 and b1.grad.dtype == torch.bfloat16
    exact = ref_angle(b1.detach().double(), b2.double(), y, mu.double())
    torch.testing.assert_close(lb.double(), exact, rtol=1e-5, atol=1e-6)


def test_angle_loss_never_saves_a_similarity_matrix():
    """Everything kept for the backward pass is O(N x C), never O(N_normal x N_abnormal)."""
    n, c = 1000, 4
    e1, e2, y, mu = make_case(n=n, c=c, abnormal=n // 2, seed=4, dtype=torch.float32)
    e1.requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = angle_loss(e1, e2, y, mu, chunk_size=64)
    loss.backward()
    assert saved and max(saved) <= 2 * n * c, max(saved)
    assert sum(saved) < 40 * n * c < n * n  # the dense matrix would be n x n (both views)
    assert torch.isfinite(e1.grad).all()


def test_angle_loss_without_negatives_raises():
    e1, e2, y, mu = make_case(n=10)
    with pytest.raises(ValueError, match="no abnormal patch"):
        angle_loss(e1, e2, torch.zeros(10, dtype=torch.bool), mu)
    with pytest.raises(ValueError, match="no normal patch"):
        angle_loss(e1, e2, torch.ones(10, dtype=torch.bool), mu)


def test_bad_labels_are_rejected():
    e1, e2, y, mu = make_case(n=10)
    with pytest.raises(ValueError, match="has 9 entries"):
        angle_loss(e1, e2, y[:9], mu)
    with pytest.raises(ValueError, match="0/1"):
        norm_loss(e1, y.float() * 0.5)


def norm_features(n: int, c: int, seed: int, scale_low: float, scale_high: float) -> torch.Tensor:
    """Features whose a = sqrt(||e|| + 1) - 1 spread over [about 0, about 1.5]."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, c, generator=g, dtype=torch.float64)
    target = scale_low + (scale_high - scale_low) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    return e / e.norm(dim=1, keepdim=True) * target


@pytest.mark.parametrize(
    "case",
    ["radius_from_abnormal", "radius_clamped_to_0.4", "no_abnormal", "all_abnormal_outside_margin"],
)
def test_norm_loss_matches_reference(case):
    n = 40
    e = norm_features(n, 6, seed=7, scale_low=0.0, scale_high=3.0)
    y = torch.zeros(n, dtype=torch.bool)
    y[::5] = True
    if case == "radius_from_abnormal":
        e[0] = e[0] / e[0].norm() * 0.3  # a(0) ~ 0.14, so r_max = 0.9 * a(0) < 0.4
    elif case == "radius_clamped_to_0.4":
        e[y] = e[y] / e[y].norm(dim=1, keepdim=True) * 2.5  # a ~ 0.87: 0.9 * a > 0.4
    elif case == "no_abnormal":
        y[:] = False
    else:
        y[:] = True
        e = e / e.norm(dim=1, keepdim=True) * 8.0  # a = 2 > 0.4 + 0.75: every group is empty
    v, (g,) = value_and_grads(lambda x: norm_loss(x, y), e)
    v_ref, (g_ref,) = value_and_grads(lambda x: ref_norm(x, y), e)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    if case == "all_abnormal_outside_margin":
        assert v == 0 and torch.all(g == 0)
    else:
        assert v > 0


def test_norm_loss_float32_and_autocast():
    e = norm_features(50, 8, seed=8, scale_low=0.0, scale_high=3.0)
    y = torch.zeros(50, dtype=torch.bool)
    y[:7] = True
    ref = ref_norm(e, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm_loss(e.float(), y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wa,wn", [(1.0, 1.0), (0.3, 2.0), (0.0, 1.0)])
def test_adpretrain_loss_sums_levels_and_reports_parts(wa, wn):
    g = torch.Generator().manual_seed(9)
    b, h, w = 2, 3, 4
    widths = [8, 12]
    f1 = [torch.randn(b, c, h, w, generator=g, dtype=torch.float64) for c in widths]
    f2 = [x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in f1]
    ya = [torch.rand(b, h, w, generator=g) < 0.3 for _ in widths]
    yn = [torch.rand(b, h, w, generator=g) < 0.3 for _ in widths]
    mus = [0.1 * torch.randn(c, generator=g, dtype=torch.float64) for c in widths]

    def flat(x: torch.Tensor) -> torch.Tensor:  # patch (image i, row r, column c) -> row i*h*w + r*w + c
        return torch.stack([x[i, :, r, col] for i in range(b) for r in range(h) for col in range(w)])

    def reference(*feats):
        a, b2 = feats[: len(widths)], feats[len(widths) :]
        parts = {}
        for i in range(len(widths)):
            parts[f"angle/l{i}"] = ref_angle(flat(a[i]), flat(b2[i]), ya[i].reshape(-1), mus[i])
            parts[f"norm1/l{i}"] = ref_norm(flat(a[i]), yn[i].reshape(-1))
            parts[f"norm2/l{i}"] = ref_norm(flat(b2[i]), yn[i].reshape(-1))
        weighted = [(wa if k.startswith("angle") else wn) * v for k, v in parts.items()]
        return sum(weighted), parts

    total, parts = adpretrain_loss(f1, f2, ya, yn, mus, TAU, chunk_size=5, angle_weight=wa, norm_weight=wn)
    ref_total, ref_parts = reference(*f1, *f2)
    assert set(parts) == set(ref_parts)
    for k in parts:
        assert not parts[k].requires_grad
        torch.testing.assert_close(parts[k], ref_parts[k].detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)

    v, grads = value_and_grads(lambda *fs: adpretrain_loss(fs[:2], fs[2:], ya, yn, mus, TAU, 5, angle_weight=wa,
                                                           norm_weight=wn)[0], *f1, *f2)
    v_ref, grads_ref = value_and_grads(lambda *fs: reference(*fs)[0], *f1, *f2)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="one entry per level"):
        adpretrain_loss(f1, f2[:1], ya, yn, mus, TAU, 5)
    assert torch.equal(sum_(total.detach().clone(), None), total.detach())
