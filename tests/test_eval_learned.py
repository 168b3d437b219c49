"""The learned evaluation methods (CFLOW, UniAD, GLASS): planted anomalies, each piece
against a direct float64 computation, seeding, and input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluate.cflow import CFlow, ConditionalFlow, positional_encoding
from pipeline.evaluate.glass import GLASS, Discriminator, ascend, ring
from pipeline.evaluate.metrics import image_metrics
from pipeline.evaluate.threads import one_thread
from pipeline.evaluate.uniad import Reconstructor, UniAD, neighbour_mask
from shards.errors import UserError

WIDTHS = (6, 10)
GRID = 8
SIZE = 32
METHODS = {"cflow": CFlow, "uniad": UniAD, "glass": GLASS}
# Budgets of a second or two on one CPU thread for 12 images on an 8x8 grid.
SMALL = {
    "cflow": dict(blocks=2, cond_dim=32, epochs=20, batch=64, lr=3e-3),
    "uniad": dict(hidden=32, heads=4, enc_layers=1, dec_layers=1, ff=64, neighbour=3, epochs=40, batch=4,
                  lr=1e-3, clip=1.0, jitter_scale=4.0),
    "glass": dict(hidden=256, epochs=20, batch=4, lr=1e-3, r1=1.0, r2=2.0),
}
TINY = {  # a few steps: enough to tell seeds apart
    "cflow": dict(SMALL["cflow"], epochs=2),
    "uniad": dict(SMALL["uniad"], epochs=2),
    "glass": dict(SMALL["glass"], hidden=16, epochs=2, steps=3),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # as the cells run on the CPU
        yield


def planted(seed: int, n_train: int = 12, n_test: int = 8, noise: float = 0.1):
    """A fixed texture per level and position (norm 3) plus noise; every abnormal test image
    has a 3x3 blob of patches replaced by random vectors of the same norm (not a shift, so
    the feature norm alone does not tell them apart)."""
    g = torch.Generator().manual_seed(seed)
    tex = [F.normalize(torch.randn(c, GRID, GRID, generator=g), dim=0) * 3.0 for c in WIDTHS]

    def sample(n: int) -> list[torch.Tensor]:
        return [t + noise * torch.randn(n, *t.shape, generator=g) for t in tex]

    train, test = sample(n_train), sample(2 * n_test)
    for i in range(n_test, 2 * n_test):
        y, x = torch.randint(0, GRID - 2, (2,), generator=g).tolist()
        for f in test:
            blob = F.normalize(torch.randn(f.shape[1], 3, 3, generator=g), dim=0) * 3.0
            f[i, :, y : y + 3, x : x + 3] = blob + noise * torch.randn(blob.shape, generator=g)
    return train, test, torch.tensor([0] * n_test + [1] * n_test)


@pytest.fixture(scope="module")
def data():
    return planted(0)


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("name", list(METHODS))
def test_separates_planted_anomalies(name, data):
    train, test, labels = data
    maps, scores = METHODS[name](**SMALL[name]).fit(train).predict(test, SIZE)
    assert maps.shape == (len(labels), SIZE, SIZE) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert torch.equal(scores, maps.flatten(1).amax(dim=1))
    auroc = image_metrics(scores, labels)["image_auroc"]
    assert auroc > 0.95, f"{name}: image AUROC {auroc:.3f}"


@pytest.mark.parametrize("name", list(METHODS))
def test_seeded_and_leaves_global_state_alone(name, data):
    train, test, _ = data
    before = torch.get_rng_state()
    a = METHODS[name](**TINY[name], seed=0).fit(train).predict(test, SIZE)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)  # a different global state must not matter
    b = METHODS[name](**TINY[name], seed=0).fit(train).predict(test, SIZE)
    c = METHODS[name](**TINY[name], seed=1).fit(train).predict(test, SIZE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name", list(METHODS))
def test_input_checks(name, data):
    train, test, _ = data
    m = METHODS[name](**TINY[name])
    with pytest.raises(RuntimeError, match="before fit"):
        m.predict(test, SIZE)
    with pytest.raises(ValueError, match="list over levels"):
        m.fit([])
    m.fit(train)
    with pytest.raises(ValueError, match="widths"):
        m.predict([test[0], test[1][:, :-1]], SIZE)
    with pytest.raises(ValueError, match="batch size and grid"):
        m.predict([test[0], test[1][:3]], SIZE)
    with pytest.raises(ValueError):
        METHODS[name](epochs=0)


@pytest.mark.parametrize("name", ["cflow", "uniad"])
def test_grid_fixed_at_fit(name, data):
    train, test, _ = data
    m = METHODS[name](**TINY[name]).fit(train)
    with pytest.raises(ValueError, match="grid"):
        m.predict([f[:, :, :4, :4] for f in test], SIZE)


# ---------------------------------------------------------------- CFLOW


def test_positional_encoding_against_formula():
    d, h, w = 8, 3, 5
    p = positional_encoding(d, h, w).double()
    half = d // 2
    for i in range(h):
        for j in range(w):
            for m in range(half // 2):
                f = 10000.0 ** (-2 * m / half)
                want = [math.sin(j * f), math.cos(j * f), math.sin(i * f), math.cos(i * f)]
                got = [p[i * w + j, k].item() for k in (2 * m, 2 * m + 1, half + 2 * m, half + 2 * m + 1)]
                assert got == pytest.approx(want, abs=1e-6)


def _random_flow(c: int, cond: int, blocks: int, seed: int = 0) -> ConditionalFlow:
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(c, generator=g) for _ in range(blocks)]
    flow = ConditionalFlow(c, cond, blocks, 1.9, perms).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        flow.mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        flow.std.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return flow


def _flow_by_hand(flow: ConditionalFlow, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """z of one (C,) feature, written out operation by operation."""
    z = (x - flow.mean) / flow.std
    for blk in flow.blocks:
        k = blk.keep
        lin1, lin2 = blk.subnet[0], blk.subnet[2]
        hidden = torch.relu(lin1.weight @ torch.cat([z[:k], cond]) + lin1.bias)
        a = 0.1 * (lin2.weight @ hidden + lin2.bias)
        n2 = z.shape[0] - k
        s = 1.9 * torch.tanh(a[:n2])
        y = torch.cat([z[:k], z[k:] * torch.exp(s) + a[n2:]])
        y = y * torch.log1p(torch.exp(blk.scale_raw)) + blk.offset
        z = y[blk.perm]
    return z


@pytest.mark.parametrize("c", [1, 5, 6])
def test_flow_log_likelihood_is_the_change_of_variables(c):
    cond_dim, n = 4, 7
    flow = _random_flow(c, cond_dim, blocks=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    cond = torch.randn(n, cond_dim, generator=g, dtype=torch.float64)
    z, logdet = flow(x, cond)
    ll = flow.log_likelihood(x, cond)
    for i in range(n):
        z_ref = _flow_by_hand(flow, x[i], cond[i])
        jac = torch.autograd.functional.jacobian(lambda v: _flow_by_hand(flow, v, cond[i]), x[i])
        logdet_ref = torch.linalg.slogdet(jac).logabsdet
        ll_ref = (-0.5 * c * math.log(2 * math.pi) - 0.5 * z_ref.square().sum() + logdet_ref) / c
        torch.testing.assert_close(z[i], z_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logdet[i], logdet_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ll[i], ll_ref, rtol=1e-10, atol=1e-10)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: flow.log_likelihood(v, cond), (x,))


def test_float32_flow_matches_float64():
    flow64 = _random_flow(6, 4, blocks=4)
    flow32 = _random_flow(6, 4, blocks=4).float()
    x = torch.randn(50, 6, dtype=torch.float64)
    cond = torch.randn(50, 4, dtype=torch.float64)
    torch.testing.assert_close(flow32.log_likelihood(x.float(), cond.float()).double(),
                               flow64.log_likelihood(x, cond), rtol=1e-4, atol=1e-4)


def test_cflow_scores_lie_in_zero_to_levels(data):
    train, test, _ = data
    m = CFlow(**TINY["cflow"]).fit(train)
    s = m.patch_scores(test)
    assert s.min() >= 0 and s.max() <= len(WIDTHS)
    # the normalisation m_l is the largest log p / C of the fit patches, per level
    torch.testing.assert_close(m.log_likelihoods(train).flatten(1).amax(dim=1), m.ref)


# ---------------------------------------------------------------- UniAD


@pytest.mark.parametrize("h,w,k", [(5, 6, 3), (4, 4, 1), (6, 5, 4), (3, 7, 5)])
def test_neighbour_mask_against_pairs(h, w, k):
    mask = neighbour_mask(h, w, k)
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = abs(i // w - j // w), abs(i % w - j % w)
            assert bool(mask[i, j]) == (dy <= k // 2 and dx <= k // 2)


def test_masked_positions_get_zero_attention():
    model = Reconstructor(5, (6, 6), hidden=16, heads=2, enc_layers=1, dec_layers=2, ff=8, dropout=0.0,
                          neighbour=3).eval()
    assert torch.equal(model.mask, neighbour_mask(6, 6, 3))
    masks_seen = []

    def hook(module, args, kwargs):
        masks_seen.append(kwargs["attn_mask"])

    attns = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    handles = [a.register_forward_pre_hook(hook, with_kwargs=True) for a in attns]
    tokens = torch.randn(2, 36, 5)
    with torch.no_grad():
        model(tokens)
    for hd in handles:
        hd.remove()
    assert len(masks_seen) == len(attns) == 5 and all(m is model.mask for m in masks_seen)
    x = model.input_proj(tokens)
    q = x + model.positions()
    for attn in attns:
        _, weights = attn(q, q, x, attn_mask=model.mask, need_weights=True, average_attn_weights=False)
        assert weights[:, :, model.mask].abs().max() == 0
        torch.testing.assert_close(weights.sum(dim=3), torch.ones(2, 2, 36))


def test_neighbour_mask_covering_the_grid_is_refused(data):
    train, _, _ = data
    with pytest.raises(UserError, match="smaller neighbour size"):
        UniAD(**dict(TINY["uniad"], neighbour=9)).fit(train)


# ---------------------------------------------------------------- GLASS


def _bce_on_ones(disc: Discriminator, true: torch.Tensor, gaus: torch.Tensor) -> torch.Tensor:
    scores = disc(torch.cat([true, gaus]))[true.shape[0] :]
    return -torch.log(scores).mean()


def test_gradient_ascent_step_against_autograd():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        disc = Discriminator(4, hidden=8).double().train()
    true = torch.randn(6, 4, dtype=torch.float64)
    gaus = true + 0.3 * torch.randn(6, 4, dtype=torch.float64)
    step = 1e-3
    moved = ascend(disc, true, gaus, step)
    g = gaus.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_bce_on_ones(disc, true, g), g)
    unit = grad / grad.norm(dim=1, keepdim=True)
    torch.testing.assert_close(moved, gaus + step * unit, rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # the loss on the synthetic features goes up along the step
        eps = 1e-6
        slope = (_bce_on_ones(disc, true, gaus + eps * unit) - _bce_on_ones(disc, true, gaus - eps * unit)) / (2 * eps)
        assert slope > 0
        torch.testing.assert_close(slope, (grad * unit).sum(), rtol=1e-5, atol=1e-9)
        assert _bce_on_ones(disc, true, moved) > _bce_on_ones(disc, true, gaus)


def test_ring_projection_keeps_the_distance_in_range():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 7, generator=g, dtype=torch.float64)
    dirs = F.normalize(torch.randn(5, 7, generator=g, dtype=torch.float64), dim=1)
    dist = torch.tensor([0.1, 0.5, 0.7, 2.0, 3.0], dtype=torch.float64)
    out = ring(centres + dirs * dist[:, None], centres, 0.5, 2.0)
    torch.testing.assert_close((out - centres).norm(dim=1), dist.clamp(0.5, 2.0))
    torch.testing.assert_close(F.normalize(out - centres, dim=1), dirs)


@pytest.mark.parametrize("steps,every", [(20, 5), (7, 5), (3, 1)])
def test_synthetic_features_lie_in_the_ring(steps, every):
    m = GLASS(steps=steps, project_every=every, r1=0.5, r2=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m.disc = Discriminator(12, hidden=16).train()
        true = torch.randn(40, 12)
        d = (m.synthesize(true) - true).norm(dim=1)
    assert d.min() >= 0.5 - 1e-5 and d.max() <= 1.0 + 1e-5
