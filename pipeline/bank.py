"""The reference bank of a training worker, resident where the step computes.

Every (source, class, view) group of the stored bank (:class:`pipeline.refbank.RefBankStore`)
is loaded once into one fp16 tensor per level, ``(G, M, h*w, C)``. On a CUDA worker it lives
on the device when it fits in ``train.bank_memory_fraction`` of the free device memory, so a
step's references are gathered on the device and no reference byte crosses the host link;
otherwise it stays in pinned host memory, the step's references are gathered there and sent
with one non-blocking copy per level. Only the indices of the drawn images (B x (1 + K)
integers) travel to the device each step.

The draw is the store's (:func:`pipeline.matching.pick_references`, the same generator calls),
so a CPU run draws exactly the references it drew from the store.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from pipeline.devices import to_device
from pipeline.matching import pick_references
from pipeline.refbank import RefBankStore
from shards.errors import UserError

log = logging.getLogger(__name__)


def _fits_on_device(nbytes: int, device: torch.device, fraction: float) -> bool:
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


class WorkerBank:
    """Every group's references per level as ``(G, M, h*w, C)`` fp16, on ``device`` or pinned host memory."""

    def __init__(self, store: RefBankStore, device: torch.device, memory_fraction: float = 0.5) -> None:
        self.device = device
        self.groups = store.groups()
        self.index = {g: i for i, g in enumerate(self.groups)}
        groups = store.manifest()["groups"]
        self.keys = [groups[g]["image_keys"] for g in self.groups]
        self.where = f"the bank at {store.url!r}"
        sizes = {len(k) for k in self.keys}
        if len(sizes) != 1:
            raise UserError(f"{self.where} holds groups of different sizes {sorted(sizes)}; "
                            "rebuild it (`adpretrain refbank CONFIG`)")
        feats: list[Tensor] = []
        for gi, group in enumerate(self.groups):  # one group in memory at a time besides the result
            for lv, f in enumerate(store.load(group)):  # (M, C, h, w) fp16
                if gi == 0:
                    m, c, h, w = f.shape
                    feats.append(torch.empty(len(self.groups), m, h * w, c, dtype=f.dtype))
                feats[lv][gi] = f.permute(0, 2, 3, 1).flatten(1, 2)
        self.nbytes = sum(f.numel() * f.element_size() for f in feats)
        self.on_device = device.type == "cpu" or _fits_on_device(self.nbytes, device, memory_fraction)
        self.feats = [f.to(device) if self.on_device else f.pin_memory() for f in feats]
        log.info("reference bank: %d groups, %.1f MiB fp16, kept %s", len(self.groups), self.nbytes / 2**20,
                 f"on {device}" if self.on_device else f"in pinned host memory (more than {memory_fraction:.0%} "
                 f"of the free memory of {device})")

    def draw(self, groups: list[str], keys: list[str], k: int, gen: torch.Generator) -> list[Tensor]:
        """Per level a ``(B, k*h*w, C)`` float32 bank on the device: ``k`` images of each
        sample's group, never the sample itself."""
        missing = sorted(set(groups) - self.index.keys())
        if missing:
            raise UserError(f"groups {missing} are not in {self.where}; rebuild the bank for the current "
                            "shards (`adpretrain refbank CONFIG`)")
        index = [self.index[g] for g in groups]
        gi = torch.tensor(index, dtype=torch.long)
        picks = torch.stack([pick_references(self.keys[i], k, gen, key, f"group {g!r} of {self.where}")
                             for i, g, key in zip(index, groups, keys)])  # (B, k) on the host
        if self.on_device:
            gi, picks = to_device(gi, self.device), to_device(picks, self.device)
        out = []
        for f in self.feats:
            refs = f[gi[:, None], picks].reshape(len(groups), -1, f.shape[-1])  # gathered where the bank lives
            if not self.on_device:
                refs = to_device(refs, self.device)
            out.append(refs.float())
        return out
