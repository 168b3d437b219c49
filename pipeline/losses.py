"""The two pretraining losses (METHOD.md section 4), chunked and multi-rank.

Angle loss: z = normalise(e - mu) for both views (2N vectors); for every patch,
``loss_i = logsumexp_{j in neg(i)}(z_i . z_j / tau) - s+_i / tau`` where neg(i) is every
patch of the other label (both views, all ranks) and s+_i = z'_i . z''_i; mean over all 2N
patches of the global batch. The logsumexp is streamed over blocks of ``chunk_size`` rows x
``chunk_size`` negatives by a custom autograd function that recomputes each block in the
backward pass, so neither pass ever holds the N_normal x N_abnormal similarity matrix: peak
memory is O(chunk_size^2) for the blocks plus O(N x C) for the features.

Norm loss: a = sqrt(||e|| + 1) - 1; radius from the (global) minimum over abnormal patches;
weighted softplus penalties per group, each group's mean over the global batch, an empty
group contributing 0.

Multi-rank: a loss runs distributed if and only if ``group`` is a process group (pass
``torch.distributed.group.WORLD`` for the default one); ``group=None`` is one process, even
when torch.distributed is initialised. Every rank passes its LOCAL patches. Negatives are
gathered from all ranks with gradient (the gradient of a gathered feature is summed back
to the rank that owns it), means divide by global counts, and the norm radius uses the
global minimum. Each rank gets its SHARE of the loss: the sum of the shares over ranks is
the single-process loss on the concatenated batch, and the per-rank parameter gradients
sum to the single-process gradient. Ranks may hold different numbers of patches. Every
collective goes through :mod:`pipeline.collectives`.

All arithmetic runs in float32 (float64 when the inputs are float64), with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import collectives
from pipeline.collectives import ProcessGroup


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _as_bool(labels: Tensor, n: int, name: str) -> Tensor:
    """Flatten labels to (n,) bool (True = abnormal); accepts bool or 0/1 values."""
    if labels.numel() != n:
        raise ValueError(f"{name} has {labels.numel()} entries but the features have {n} patches")
    y = labels.reshape(-1)
    if y.dtype == torch.bool:
        return y
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{name} must be bool or 0/1 (True/1 = abnormal); got other values")
    return y != 0


def _blocks(idx: Tensor, size: int) -> list[Tensor]:
    return list(idx.split(size)) if idx.numel() else []


_EPS = 1e-12  # as F.normalize: rows are divided by max(||d||, eps)


def _inv_norms(d: Tensor) -> Tensor:
    return 1.0 / torch.linalg.vector_norm(d, dim=1).clamp_min(_EPS)


def _unit_rows(d: Tensor, inv: Tensor, idx: Tensor) -> Tensor:
    """The normalised rows ``idx`` of d (a copy of chunk x C)."""
    return d.index_select(0, idx).mul_(inv[idx, None])


def _to_centred_grad(g: Tensor, d: Tensor, inv: Tensor, chunk: int) -> None:
    """In place, block by block: gradient w.r.t. z = d / ||d|| -> gradient w.r.t. d.

    dL/dd = (g - z (z . g)) / ||d||.
    """
    for r0 in range(0, d.shape[0], chunk):
        gb, ib = g[r0 : r0 + chunk], inv[r0 : r0 + chunk, None]
        zb = d[r0 : r0 + chunk] * ib
        gb.sub_(zb * torch.linalg.vecdot(zb, gb)[:, None]).mul_(ib)


class _AngleRows(torch.autograd.Function):
    """Per-row angle loss ``lse_i - inv_tau * z_i . z_partner(i)`` of the 2n local rows.

    Inputs are centred features d = e - mu (normalised here, z = d / ||d||): rows 0..n-1 of
    ``d`` are view 1 and rows n..2n-1 view 2, so the partner of row i is row i +- n; ``dk``
    holds the columns (every rank's rows; ``d`` itself in one process). lse_i = log sum over
    the columns j of the other label of exp(z_i . zk_j * inv_tau). Rows and columns are
    taken in blocks of ``chunk`` by index, and the backward pass recomputes each
    (chunk x chunk) block from d, dk and the saved lse: memory beyond the features and
    their gradients is O(chunk * C + chunk^2) in both passes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, d: Tensor, dk: Tensor, d_abnormal: Tensor, k_abnormal: Tensor, inv_tau: float, chunk: int
    ) -> Tensor:
        shared = d is dk
        inv = _inv_norms(d)
        inv_k = inv if shared else _inv_norms(dk)
        lse = torch.empty(d.shape[0], dtype=d.dtype, device=d.device)
        for rows, cols in _pairs(d_abnormal, k_abnormal, chunk):  # the caller has autocast off
            for r in rows:
                qb = _unit_rows(d, inv, r)
                acc = torch.full((r.numel(),), float("-inf"), dtype=d.dtype, device=d.device)
                for c in cols:
                    s = torch.mm(qb, _unit_rows(dk, inv_k, c).T).mul_(inv_tau)
                    acc = torch.logaddexp(acc, torch.logsumexp(s, dim=1))
                    del s
                lse.index_copy_(0, r, acc)
        ctx.save_for_backward(d, dk, d_abnormal, k_abnormal, lse, inv, inv_k)
        ctx.inv_tau, ctx.chunk, ctx.shared = inv_tau, chunk, shared
        n = d.shape[0] // 2
        pos = torch.linalg.vecdot(d[:n], d[n:]) * inv[:n] * inv[n:] * inv_tau
        return lse - torch.cat([pos, pos])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None, None, None]:  # type: ignore[override]
        d, dk, d_abnormal, k_abnormal, lse, inv, inv_k = ctx.saved_tensors
        inv_tau, chunk = ctx.inv_tau, ctx.chunk
        # gradients w.r.t. the unit vectors first, turned into gradients w.r.t. d at the end
        gz = torch.zeros_like(d)
        gk = gz if ctx.shared else torch.zeros_like(dk)  # one process: rows and columns are one tensor
        scale = grad.to(d.dtype) * inv_tau
        with torch.autocast(d.device.type, enabled=False):
            for rows, cols in _pairs(d_abnormal, k_abnormal, chunk):
                for r in rows:
                    qb = _unit_rows(d, inv, r)
                    lb, sb = lse[r, None], scale[r, None]
                    gqb = torch.zeros_like(qb)
                    for c in cols:
                        kb = _unit_rows(dk, inv_k, c)
                        # p_ij: softmax weight of negative j for row i, times the row's upstream gradient / tau
                        p = torch.mm(qb, kb.T).mul_(inv_tau).sub_(lb).exp_().mul_(sb)
                        gqb.addmm_(p, kb)
                        gk.index_add_(0, c, torch.mm(p.T, qb))
                        del p
                    gz.index_add_(0, r, gqb)
            # the positive term of rows i and partner(i) both hold z_i . z_partner(i)
            n = d.shape[0] // 2
            pair = (scale[:n] + scale[n:])[:, None]
            gz[:n].addcmul_(d[n:], pair * inv[n:, None], value=-1.0)
            gz[n:].addcmul_(d[:n], pair * inv[:n, None], value=-1.0)
            _to_centred_grad(gz, d, inv, chunk)
            if not ctx.shared:
                _to_centred_grad(gk, dk, inv_k, chunk)
        return gz, None if ctx.shared else gk, None, None, None, None


def _pairs(q_abnormal: Tensor, k_abnormal: Tensor, chunk: int) -> list[tuple[list[Tensor], list[Tensor]]]:
    """(row blocks, column blocks): normal rows against abnormal columns, and the reverse."""
    qa = q_abnormal.nonzero().squeeze(1)
    qn = (~q_abnormal).nonzero().squeeze(1)
    ka = k_abnormal.nonzero().squeeze(1)
    kn = (~k_abnormal).nonzero().squeeze(1)
    return [(_blocks(qn, chunk), _blocks(ka, chunk)), (_blocks(qa, chunk), _blocks(kn, chunk))]


def angle_loss(
    e1: Tensor,
    e2: Tensor,
    labels: Tensor,
    center: Tensor,
    tau: float = 0.15,
    chunk_size: int = 4096,
    group: ProcessGroup | None = None,
) -> Tensor:
    """Angle-oriented contrastive loss of one level (this rank's share; see the module doc).

    e1, e2: (N, C) projected residual features of the two views, same patch order;
    labels: (N,) bool or 0/1, True = abnormal; center: (C,) the level's normal center.
    Raises ValueError when the (global) batch has no abnormal or no normal patch.
    """
    if e1.dim() != 2 or e1.shape != e2.shape:
        raise ValueError(f"angle_loss: e1 and e2 must both be (N, C); got {tuple(e1.shape)} and {tuple(e2.shape)}")
    if center.shape != (e1.shape[1],):
        raise ValueError(f"angle_loss: center must be ({e1.shape[1]},), got {tuple(center.shape)}")
    if chunk_size < 1 or tau <= 0:
        raise ValueError(f"angle_loss: chunk_size ({chunk_size}) and tau ({tau}) must be positive")
    y = _as_bool(labels, e1.shape[0], "angle_loss labels")
    dtype = _compute_dtype(e1)
    inv_tau = 1.0 / tau
    with torch.autocast(e1.device.type, enabled=False):
        # rows 0..N-1: view 1, rows N..2N-1: view 2 (the positive of row i is row i +- N)
        d = torch.cat([e1.to(dtype), e2.to(dtype)]).sub_(center.to(dtype))
        y2 = torch.cat([y, y])
        if group is None:
            dk, yk = d, y2
        else:
            dk, yk = collectives.gather_rows(d, y2, group)
        n_abnormal = int(yk.sum())
        if n_abnormal == 0:
            raise ValueError(
                "angle_loss: the batch has no abnormal patch, so normal patches have no negatives; "
                "every batch must hold anomalies (mix normal and abnormal streams)"
            )
        if n_abnormal == yk.numel():
            raise ValueError("angle_loss: the batch has no normal patch, so abnormal patches have no negatives")
        return _AngleRows.apply(d, dk, y2, yk, inv_tau, chunk_size).sum() / yk.numel()


def norm_loss(e: Tensor, labels: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Norm-oriented contrastive loss of one view of one level (this rank's share).

    e: (N, C) projected residual features (not centred); labels: (N,) bool or 0/1.
    The radius r_max is a constant (no gradient), as are the weights w.
    """
    if e.dim() != 2:
        raise ValueError(f"norm_loss: e must be (N, C), got {tuple(e.shape)}")
    y = _as_bool(labels, e.shape[0], "norm_loss labels")
    dtype = _compute_dtype(e)
    with torch.autocast(e.device.type, enabled=False):
        a = torch.sqrt(e.to(dtype).norm(dim=1) + 1) - 1
        ad = a.detach()
        amin = torch.cat([ad[y], ad.new_tensor([float("inf")])]).min()  # +inf when no abnormal patch
        collectives.min_(amin, group, "norm_loss radius")
        r_max = torch.clamp(0.9 * amin, max=0.4)
        r_min = 0.99 * r_max
        bound = r_max + 0.75
        groups = [
            (~y & (ad > r_max), a - r_max),  # normal patches outside the sphere
            (~y & (ad < r_min), r_min - a),  # normal patches too close to the center
            (y & (ad < bound), bound - a),  # abnormal patches inside the margin
        ]
        sums, counts = [], []
        for mask, gap in groups:
            d = gap[mask]
            sums.append((torch.exp(d.detach()) * F.softplus(d)).sum())
            counts.append(mask.sum())
        count = torch.stack(counts).to(dtype)
        collectives.sum_(count, group, "norm_loss counts")
        return (torch.stack(sums) / count.clamp(min=1)).sum()


def _flat(f: Tensor) -> Tensor:
    """(B, C, h, w) -> (B*h*w, C), patches in (image, row, column) order."""
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def adpretrain_loss(
    feats1: list[Tensor],
    feats2: list[Tensor],
    angle_labels: list[Tensor],
    norm_labels: list[Tensor],
    centers: list[Tensor],
    tau: float,
    chunk_size: int,
    group: ProcessGroup | None = None,
    angle_weight: float = 1.0,
    norm_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss = sum over levels of angle_weight * angle + norm_weight * (norm(view 1) + norm(view 2))
    (this rank's share; the method weighs both 1).

    feats: per level (B, C_l, h, w); labels: per level (B, h, w); centers: per level (C_l,).
    Returns the total and the detached, unweighted per-level parts "angle/l{i}", "norm1/l{i}", "norm2/l{i}".
    """
    n = len(feats1)
    if not n or any(len(x) != n for x in (feats2, angle_labels, norm_labels, centers)):
        raise ValueError(
            "adpretrain_loss: feats1, feats2, angle_labels, norm_labels and centers need one entry per level; "
            f"got {[len(x) for x in (feats1, feats2, angle_labels, norm_labels, centers)]}"
        )
    levels: list[Tensor] = []
    parts: dict[str, Tensor] = {}
    for i, (f1, f2, ya, yn, mu) in enumerate(zip(feats1, feats2, angle_labels, norm_labels, centers)):
        if f1.shape != f2.shape or f1.dim() != 4:
            raise ValueError(f"level {i}: both views must be (B, C, h, w); got {tuple(f1.shape)}, {tuple(f2.shape)}")
        e1, e2 = _flat(f1), _flat(f2)
        la = angle_loss(e1, e2, ya, mu, tau=tau, chunk_size=chunk_size, group=group)
        n1 = norm_loss(e1, yn, group=group)
        n2 = norm_loss(e2, yn, group=group)
        parts[f"angle/l{i}"], parts[f"norm1/l{i}"], parts[f"norm2/l{i}"] = la.detach(), n1.detach(), n2.detach()
        levels.append(angle_weight * la + norm_weight * (n1 + n2))
    return torch.stack(levels).sum(), parts
