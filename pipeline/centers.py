"""The centers (METHOD.md §2): the mean residual of normal patches per level, and their file.

- :class:`CenterAccumulator`: per-level float64 sum and count of normal residuals, merged from
  other processes; mean = the centers.
- :func:`save_centers` / :func:`load_centers`: one safetensors file (``level<i>`` tensors, see
  :mod:`pipeline.levels`) whose metadata holds the backbone id, the number of levels and the
  settings they were computed with. Which images, and where the file lies, is the centers
  stage's (:mod:`pipeline.stages.centers`).
"""

from __future__ import annotations

import io
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from pipeline import levels
from shards import storage
from shards.errors import DataError, UserError


class CenterAccumulator:
    """Per-level float64 sum and count of the residuals of normal patches.

    ``add`` per batch, ``merge`` the sums and counts returned by other processes, then ``centers``.
    """

    def __init__(self, widths: list[int]) -> None:
        self.widths = list(widths)
        self.sums = [torch.zeros(c, dtype=torch.float64) for c in self.widths]
        self.counts = torch.zeros(len(self.widths), dtype=torch.float64)

    def add(self, level_residuals: list[Tensor], normal_mask: list[Tensor]) -> None:
        """Add (B, C_l, h, w) residuals where the (B, h, w) boolean mask is True (normal patches)."""
        if len(level_residuals) != len(self.widths) or len(normal_mask) != len(self.widths):
            raise ValueError(
                f"expected {len(self.widths)} levels, got {len(level_residuals)} residuals and {len(normal_mask)} masks"
            )
        for lv, (r, m) in enumerate(zip(level_residuals, normal_mask)):
            b, c, h, w = r.shape
            if c != self.widths[lv] or tuple(m.shape) != (b, h, w):
                raise ValueError(
                    f"level {lv}: residual {tuple(r.shape)} (width {self.widths[lv]} expected) "
                    f"and mask {tuple(m.shape)} do not fit"
                )
            m = m.to(device=r.device, dtype=torch.bool)
            self.sums[lv] += r.detach().permute(0, 2, 3, 1)[m].double().sum(0).cpu()
            self.counts[lv] += float(m.sum())

    def merge(self, sums: list[Tensor], counts: Tensor) -> None:
        """Add another accumulator's ``sums`` and ``counts``."""
        if len(sums) != len(self.sums) or any(s.shape != t.shape for s, t in zip(sums, self.sums)):
            raise ValueError(f"cannot merge sums of shapes {[tuple(s.shape) for s in sums]} into widths {self.widths}")
        for lv, s in enumerate(sums):
            self.sums[lv] += s.double().cpu()
        self.counts += counts.double().cpu()

    def centers(self) -> list[Tensor]:
        """Mean normal residual per level, float32 (C_l,)."""
        empty = [lv for lv, n in enumerate(self.counts.tolist()) if n == 0]
        if empty:
            raise DataError(f"no normal patches were seen for levels {empty}: the centers need normal images")
        return [(s / n).float() for s, n in zip(self.sums, self.counts.tolist())]


def save_centers(url: str, centers: list[Tensor], backbone_id: str, meta: dict) -> None:
    """Store centers as safetensors (``level<i>``) with the backbone id and ``meta``; atomic write."""
    tensors = levels.by_name([c.detach().float().cpu().contiguous() for c in centers])
    info = {"backbone_id": backbone_id, "levels": str(len(centers)), "meta": json.dumps(meta, sort_keys=True)}
    storage.write_bytes(url, st_save(tensors, metadata=info))


def load_centers(url: str, backbone_id: str | None = None) -> tuple[list[Tensor], dict]:
    """Centers and their meta (with ``backbone_id``); a given ``backbone_id`` must match the stored one."""
    if not storage.exists(url):
        raise UserError(f"no centers at {url!r}: run `adpretrain centers CONFIG` first")
    data = storage.read_bytes(url)
    try:
        tensors, (info, _) = st_load(data), levels.read_header(io.BytesIO(data))
        centers = levels.in_order(tensors, int(info["levels"]))
        meta = json.loads(info["meta"])
    except Exception as e:  # a truncated or foreign file fails in safetensors, struct or json
        raise UserError(f"centers file {url!r} cannot be read ({type(e).__name__}: {e}); rerun `adpretrain centers`") from None
    if backbone_id is not None and info["backbone_id"] != backbone_id:
        raise UserError(
            f"centers at {url!r} belong to backbone {info['backbone_id']!r}, not {backbone_id!r}; "
            "compute them for this backbone with `adpretrain centers CONFIG`"
        )
    meta["backbone_id"] = info["backbone_id"]
    return centers, meta
