"""The projector against a direct float64 implementation of METHOD.md section 3."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pipeline.config import ProjectorSpec
from pipeline.projector import (LevelProjector, MemoryAttention, Projector, SEGate, blocked_attention,
                                effective_heads, se_width)


def ref_se(x: torch.Tensor, se: SEGate) -> torch.Tensor:
    """SE gate: mean over tokens -> FC -> ReLU -> FC -> sigmoid, multiplies the hidden units."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        s = x[b].sum(dim=0) / x.shape[1]
        h = torch.clamp(se.fc1.weight @ s + se.fc1.bias, min=0)
        gate = 1 / (1 + torch.exp(-(se.fc2.weight @ h + se.fc2.bias)))
        out[b] = x[b] * gate
    return out


def ref_attention(x: torch.Tensor, memory: torch.Tensor, att: MemoryAttention) -> torch.Tensor:
    """Multi-head attention, one head and one image at a time, softmax written out."""
    c = x.shape[-1]
    heads = att.heads
    d = c // heads
    wk, wv = att.kv.weight[:c], att.kv.weight[c:]
    bk, bv = att.kv.bias[:c], att.kv.bias[c:]
    k_all = memory @ wk.T + bk
    v_all = memory @ wv.T + bv
    out = []
    for b in range(x.shape[0]):
        q_all = x[b] @ att.q.weight.T + att.q.bias
        per_head = []
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            logits = q_all[:, cols] @ k_all[:, cols].T / math.sqrt(d)
            w = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            w = w / w.sum(dim=1, keepdim=True)
            per_head.append(w @ v_all[:, cols])
        o = torch.cat(per_head, dim=1)
        out.append(o @ att.out.weight.T + att.out.bias)
    return torch.stack(out)


def ref_level(x: torch.Tensor, p: LevelProjector) -> torch.Tensor:
    """Whole level block: x1 = x - Attn(x, M', M'); out = x1 + W2 GELU(SE(W1 x1))."""
    b, c, h, w = x.shape
    t = x.reshape(b, c, h * w).permute(0, 2, 1)
    mem = p.memory @ p.memory_map.weight.T + p.memory_map.bias
    x1 = t - ref_attention(t, mem, p.attn)
    hidden = ref_se(x1 @ p.fc1.weight.T + p.fc1.bias, p.se)
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    out = x1 + gelu @ p.fc2.weight.T + p.fc2.bias
    return out.permute(0, 2, 1).reshape(b, c, h, w)


def grads_of(fn, inputs: list[torch.Tensor], params: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    out = fn()
    return list(torch.autograd.grad(out, inputs + params, upstream))


def assert_same(fast, ref, inputs, params, out_shape):
    torch.manual_seed(5)
    upstream = torch.randn(out_shape, dtype=torch.float64)
    torch.testing.assert_close(fast(), ref(), rtol=1e-10, atol=1e-10)
    g_fast = grads_of(fast, inputs, params, upstream)
    g_ref = grads_of(ref, inputs, params, upstream)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_se_gate_matches_reference():
    torch.manual_seed(0)
    se = SEGate(64, 16).double()
    x = torch.randn(3, 10, 64, dtype=torch.float64, requires_grad=True)
    assert se.fc1.out_features == 8
    assert_same(lambda: se(x), lambda: ref_se(x, se), [x], list(se.parameters()), x.shape)


@pytest.mark.parametrize("block_scores", [1 << 19, 4 * 13 * 5])
def test_attention_matches_reference(block_scores, monkeypatch):
    """In one block and in blocks of 5 query rows (of the 18 that the batch folds into)."""
    import pipeline.projector

    monkeypatch.setattr(pipeline.projector, "CPU_BLOCK_SCORES", block_scores)
    torch.manual_seed(1)
    att = MemoryAttention(24, 4).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(13, 24, dtype=torch.float64, requires_grad=True)
    assert_same(lambda: att(x, mem), lambda: ref_attention(x, mem, att), [x, mem], list(att.parameters()), x.shape)


@pytest.mark.parametrize("rows", [1, 4, 7, 100])
def test_blocked_attention_matches_reference_over_any_blocks(rows):
    """Blocks of query rows, the last one short, give softmax(q k^T / sqrt(d)) v and its gradients."""
    torch.manual_seed(4)
    q = torch.randn(3, 18, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 11, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 11, 5, dtype=torch.float64, requires_grad=True)

    def ref():
        heads = []
        for h in range(3):
            logits = q[h] @ k[h].T / math.sqrt(5)
            w = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            heads.append((w / w.sum(dim=1, keepdim=True)) @ v[h])
        return torch.stack(heads)

    assert_same(lambda: blocked_attention(q, k, v, rows), ref, [q, k, v], [], q.shape)


@pytest.mark.parametrize("dim,heads", [(32, 4), (40, 16)])
def test_level_projector_matches_reference(dim, heads):
    torch.manual_seed(2)
    p = LevelProjector(dim, memory_size=20, heads=heads).double()
    x = torch.randn(2, dim, 3, 4, dtype=torch.float64, requires_grad=True)
    assert_same(lambda: p(x), lambda: ref_level(x, p), [x], list(p.parameters()), x.shape)


def test_images_do_not_interact():
    """Each image's output depends on that image only (needed for multi-rank equivalence)."""
    torch.manual_seed(3)
    p = LevelProjector(16, memory_size=8, heads=4)
    x = torch.randn(3, 16, 4, 4)
    full = p(x)
    for i in range(3):
        torch.testing.assert_close(p(x[i : i + 1])[0], full[i], rtol=1e-5, atol=1e-6)


def test_heads_fall_back_to_a_divisor_and_log_once(caplog):
    assert effective_heads(768, 16) == 16
    assert effective_heads(112, 16) == 16
    assert effective_heads(24, 16) == 12
    with caplog.at_level(logging.INFO, logger="pipeline.projector"):
        a = LevelProjector(56, memory_size=4, heads=16)
        LevelProjector(56, memory_size=4, heads=16)
    assert a.attn.heads == 14
    msgs = [r.getMessage() for r in caplog.records if "not a multiple" in r.getMessage()]
    assert len(msgs) == 1 and "width 56" in msgs[0] and "using 14 heads" in msgs[0]


def test_se_width_rounds_to_multiple_of_eight():
    assert [se_width(c, 16) for c in (3072, 4096, 160, 448, 96)] == [192, 256, 8, 32, 8]


def test_projector_levels_keep_their_shapes_and_widths():
    spec = ProjectorSpec(memory_size=16, heads=16, mlp_ratio=2, se_reduction=16)
    proj = Projector.from_spec([16, 24, 40], spec)
    assert [lp.fc1.out_features for lp in proj.levels] == [32, 48, 80]
    assert [lp.memory.shape for lp in proj.levels] == [(16, 16), (16, 24), (16, 40)]
    feats = [torch.randn(2, c, 5, 5) for c in (16, 24, 40)]
    out = proj(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]
    out[2].sum().backward()
    assert proj.levels[2].memory.grad is not None and proj.levels[0].memory.grad is None
    with pytest.raises(ValueError, match="3 levels"):
        proj(feats[:2])
    with pytest.raises(ValueError, match="expects"):
        proj([feats[1], feats[1], feats[2]])
