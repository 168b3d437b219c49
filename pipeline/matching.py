"""Nearest-normal matching (METHOD.md §2), pure tensor code: which references, and the nearest among them.

- :func:`pick_references`: the seeded draw of K distinct reference images of a group, never
  the sample itself (the reference bank's store and a training worker's resident bank draw
  with it, so both draw the same images).
- :func:`nearest_index` / :func:`match_residual`: for every patch feature, the reference vector
  of highest cosine similarity; residual = feature - that raw vector. Chunked over query
  patches, so the similarity block held at once is at most ``chunk x P``.

The same functions serve training (references drawn from the bank per step) and downstream
evaluation (a fixed K-shot reference set as a ``(1, P, C)`` bank).
"""

from __future__ import annotations

import torch
from torch import Tensor

from shards.errors import UserError


def pick_references(keys: list[str], k: int, generator: torch.Generator, exclude: str | None, where: str) -> Tensor:
    """Indices of ``k`` distinct images among ``keys`` drawn with ``generator``, never ``exclude``."""
    allowed = torch.tensor([i for i, key in enumerate(keys) if key != exclude], dtype=torch.long)
    if not 1 <= k <= len(allowed):
        raise UserError(
            f"cannot draw {k} references from {where}: it has {len(allowed)} other than the sample; "
            "raise refbank.per_group above the largest K"
        )
    return allowed[torch.randperm(len(allowed), generator=generator)[:k]]


def _check_bank(feat: Tensor, bank: Tensor, chunk: int) -> None:
    if feat.dim() != 4:
        raise ValueError(f"feat must be (B, C, h, w), got {tuple(feat.shape)}")
    if bank.dim() != 3 or bank.shape[0] not in (1, feat.shape[0]) or bank.shape[2] != feat.shape[1]:
        raise ValueError(f"bank must be (B or 1, P, C={feat.shape[1]}) for feat {tuple(feat.shape)}, got {tuple(bank.shape)}")
    if bank.shape[1] == 0:
        raise ValueError("bank holds no reference vectors")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


@torch.no_grad()
def nearest_index(feat: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    """(B, h*w) index into the bank's P vectors of the highest cosine similarity per patch.

    ``feat`` (B, C, h, w); ``bank`` (B, P, C) per sample, or (1, P, C) shared by the batch.
    At most ``chunk`` query patches are compared at a time (a chunk x P block, in float32 or
    wider). The query's own norm does not change the argmax, so only the bank's norms are
    divided out: no normalised copy of the features or the bank is made. Ties go to the
    lowest index.
    """
    _check_bank(feat, bank, chunk)
    b, c, h, w = feat.shape
    n = h * w
    dt = torch.promote_types(torch.promote_types(feat.dtype, bank.dtype), torch.float32)
    q = feat.to(dt).flatten(2).transpose(1, 2)  # (B, N, C), a view
    ref = bank.to(dt)
    inv = ref.norm(dim=-1).clamp_min(1e-12).reciprocal()  # (B or 1, P)
    shared = ref.shape[0] == 1
    idx = torch.empty(b, n, dtype=torch.long, device=feat.device)
    step = min(chunk, n)  # query patches of one sample per block
    per = max(1, chunk // n)  # samples per block when whole samples fit in a chunk
    for s in range(0, b, per):
        ref_t = ref[0].T if shared else ref[s : s + per].transpose(1, 2)
        scale = inv[0] if shared else inv[s : s + per, None, :]
        for i in range(0, n, step):
            # one expression: the previous block is freed before the next is allocated
            idx[s : s + per, i : i + step] = torch.matmul(q[s : s + per, i : i + step], ref_t).mul_(scale).argmax(-1)
    return idx


def match_residual(feat: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    """Residual (B, C, h, w) = feat - the bank vector (raw, not normalised) nearest in cosine."""
    idx = nearest_index(feat, bank, chunk)
    b, c, h, w = feat.shape
    src = bank.expand(b, -1, -1) if bank.shape[0] == 1 else bank
    matched = torch.gather(src.transpose(1, 2), 2, idx.unsqueeze(1).expand(-1, c, -1))  # (B, C, N)
    # feat - matched, computed in the gathered tensor: no second buffer the size of the features
    return matched.to(feat.dtype).neg_().add_(feat.reshape(b, c, h * w)).reshape(b, c, h, w)
