"""PatchCore: nearest-neighbour distance to a coreset of normal patch features.

- Local aggregation: every level is averaged over each patch's 3x3 neighbourhood (border
  patches average their valid neighbours only). The original implementation unfolds 3x3
  patches and adaptive-average-pools the C*9 vector back to C values, which is exactly
  this 3x3 mean per channel; plain average pooling says so directly.
- Levels are concatenated (D = sum of the level widths) rather than each pooled to a
  common width and averaged: pooling over channels averages neighbouring, unrelated
  channels, while concatenation keeps every level's features intact, so the squared
  distance is the sum of the per-level squared distances.
- Memory bank: greedy k-center coreset of the training patches (coreset_ratio of them);
  the max-min distances of the greedy selection are computed on a seeded Gaussian random
  projection to projection_dim dimensions (Johnson-Lindenstrauss), the kept patches are
  the full-width ones.
- Score of a patch: Euclidean distance to its nearest memory patch, by faiss
  (IndexFlatL2) or torch (chunked matrix products); both are exact.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.evaluate.maps import check_features, image_scores, to_image_maps
from pipeline.evaluate.threads import one_thread

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "faiss"]

# What backend="auto" uses. bench/evaluate.py (200 train + 100 test images, 16x16 grid,
# memory bank 5120, one thread, each backend in its own process, CPU seconds): nearest
# neighbours of the 25,600 test patches take 0.66 s with faiss vs 0.84 s with torch at
# width 128, 0.97 vs 1.19 at 256, 2.05 vs 2.27 at 512, 3.41 vs 4.80 at 1024: faiss is
# 1.1-1.4x faster at every width.
AUTO_BACKEND: Literal["torch", "faiss"] = "faiss"


def aggregate(feats: list[Tensor]) -> Tensor:
    """Locally aware patch features: 3x3 mean per level, levels concatenated.

    (B, C_l, h, w) per level -> (B, h, w, sum C_l) float32.
    """
    check_features(feats)
    pooled = [F.avg_pool2d(f.float(), 3, stride=1, padding=1, count_include_pad=False) for f in feats]
    return torch.cat(pooled, dim=1).permute(0, 2, 3, 1).contiguous()


def random_projection(dim: int, out_dim: int, seed: int) -> Tensor:
    """(dim, out_dim) Gaussian projection scaled to preserve squared distances on average."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, out_dim, generator=g) / math.sqrt(out_dim)


def greedy_coreset(x: Tensor, n: int, start: int = 0) -> Tensor:
    """Greedy k-center selection of n rows of x (N, d): start with row `start`, then
    repeatedly add the row farthest from everything selected so far (first index on ties).

    Returns the selected indices (n,) in selection order. Each of the n steps is a few
    small memory-bound ops, so on CPU they run on one thread: on 2 busy cores, intra-op
    threading made 5120 steps over 51200 x 128 take 654 s instead of 66 s.
    """
    total = x.shape[0]
    if not 1 <= n <= total:
        raise ValueError(f"coreset size {n} must lie in [1, {total}]")
    x = x.float()
    xt = x.t().contiguous()
    sq = (x * x).sum(dim=1)
    min_d = torch.full((total,), float("inf"), device=x.device)
    dist = torch.empty(1, total, device=x.device)
    chosen = torch.empty(n, dtype=torch.long)
    cur = start
    with one_thread():
        for i in range(n):
            chosen[i] = cur
            torch.matmul(x[cur : cur + 1], xt, out=dist)  # squared distance = |x|^2 - 2 x.c + |c|^2
            d = dist[0].mul_(-2.0).add_(sq).add_(sq[cur])
            torch.minimum(min_d, d, out=min_d)
            cur = int(torch.argmax(min_d))
    return chosen


def nearest_torch(queries: Tensor, memory: Tensor, chunk: int = 256) -> Tensor:
    """Euclidean distance of every query row to its nearest memory row (exact)."""
    m_sq = (memory * memory).sum(dim=1)
    out = torch.empty(queries.shape[0], device=queries.device)
    for s in range(0, queries.shape[0], chunk):
        q = queries[s : s + chunk]
        d = torch.addmm(m_sq, q, memory.t(), beta=1.0, alpha=-2.0)
        out[s : s + chunk] = d.amin(dim=1) + (q * q).sum(dim=1)
    return out.clamp_min_(0.0).sqrt_()


class _FaissIndex:
    """Exact L2 search with faiss-cpu."""

    def __init__(self, memory: Tensor) -> None:
        import faiss

        self.index = faiss.IndexFlatL2(memory.shape[1])
        self.index.add(np.ascontiguousarray(memory.cpu().numpy(), dtype=np.float32))

    def nearest(self, queries: Tensor) -> Tensor:
        q = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
        d, _ = self.index.search(q, 1)
        return torch.from_numpy(d[:, 0]).to(queries.device).clamp_min_(0.0).sqrt_()


class PatchCore:
    """PatchCore over a list of feature levels (see the module docstring)."""

    def __init__(
        self, coreset_ratio: float = 0.1, seed: int = 0, backend: Backend = "auto", projection_dim: int = 128
    ) -> None:
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must lie in (0, 1], got {coreset_ratio}")
        if backend not in ("auto", "torch", "faiss"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
        self.coreset_ratio = coreset_ratio
        self.seed = seed
        self.backend: Literal["torch", "faiss"] = AUTO_BACKEND if backend == "auto" else backend
        self.projection_dim = projection_dim
        self.memory: Tensor | None = None
        self._index: _FaissIndex | None = None

    def select(self, patches: Tensor) -> Tensor:
        """Indices of the coreset of (N, D) patches (all of them when coreset_ratio is 1)."""
        total = patches.shape[0]
        n = max(1, round(self.coreset_ratio * total))
        if n >= total:
            return torch.arange(total)
        g = torch.Generator().manual_seed(self.seed)
        start = int(torch.randint(total, (1,), generator=g))
        z = patches
        if patches.shape[1] > self.projection_dim:
            z = patches @ random_projection(patches.shape[1], self.projection_dim, self.seed).to(patches.device)
        return greedy_coreset(z, n, start=start)

    def fit(self, train_feats: list[Tensor]) -> "PatchCore":
        """Build the memory bank from the features of the class's normal training images."""
        patches = aggregate(train_feats).flatten(0, 2)
        idx = self.select(patches)
        log.debug("patchcore memory bank: %d of %d patches, dim %d", len(idx), len(patches), patches.shape[1])
        return self.set_memory(patches[idx.to(patches.device)])

    def set_memory(self, memory: Tensor) -> "PatchCore":
        """Use these (M, D) aggregated patch features as the memory bank."""
        self.memory = memory.float().contiguous()
        self._index = _FaissIndex(self.memory) if self.backend == "faiss" else None
        return self

    def patch_scores(self, feats: list[Tensor]) -> Tensor:
        """(B, h, w) distances of every test patch to its nearest memory patch."""
        if self.memory is None:
            raise RuntimeError("PatchCore.predict called before fit")
        emb = aggregate(feats)
        b, h, w, d = emb.shape
        if d != self.memory.shape[1]:
            raise ValueError(f"features have width {d}, the memory bank {self.memory.shape[1]}")
        q = emb.reshape(-1, d)
        dist = self._index.nearest(q) if self._index is not None else nearest_torch(q, self.memory)
        return dist.view(b, h, w)

    def predict(self, feats: list[Tensor], size: int) -> tuple[Tensor, Tensor]:
        """Maps (B, size, size) and image scores (B,) = max of each map."""
        maps = to_image_maps(self.patch_scores(feats), size)
        return maps, image_scores(maps)
