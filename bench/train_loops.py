"""The two training loops of ``bench/train.py``, measured side by side: the released data path
(image files in a DataLoader, K references read and encoded per sample at every step) and ours
(``pipeline.data.train_loader`` and the stored bank), with the same ``Step`` math, projector,
optimizer step and per-phase timing."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from pipeline.backbone import build_backbone
from pipeline.config import Config
from pipeline.transforms import (
    PhotometricViews,
    decode_image,
    decode_mask,
    image_to_tensor,
    mask_to_tensor,
    normalize,
    patch_labels,
)
from shards import storage
from shards.record import SampleRecord


# ----------------------------------------------------------------------------- data


def group_of_record(r: SampleRecord) -> str:
    """The reference group of a record, spelled as ``pipeline.data.group_of`` spells a sample's."""
    return f"{r.source}/{r.cls}/{r.view or '-'}"


def released_backbone(spec):
    """The frozen backbone as timm builds it (batch norms apart, NCHW order), as the released code runs it."""
    return build_backbone(spec, optimize=False)


def released_attention(projector: nn.Module) -> None:
    """In place: every level's memory attention as one ``F.scaled_dot_product_attention`` call."""
    for level in projector.levels:
        level.attn.attend = F.scaled_dot_product_attention


class FileImages(Dataset):
    """The released data path: one item = one image file (and its mask file) read, decoded,
    resized and centre-cropped, then two photometric views (torchvision's blur, as released),
    normalised."""

    def __init__(self, records: list[SampleRecord], size: int, mean, std, augment: bool):
        self.records, self.size, self.mean, self.std = records, size, tuple(mean), tuple(std)
        self.views = PhotometricViews(size, augment)
        if augment:  # the third step of the composition: blur with p = 0.5
            blur = self.views.transform.transforms[2]
            blur.transforms = [v2.GaussianBlur(blur.transforms[0].kernel, sigma=blur.transforms[0].sigma)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        image = image_to_tensor(decode_image(storage.read_bytes(r.url)), self.size)
        mask = decode_mask(storage.read_bytes(r.mask_url)) if r.mask_url else None
        v1, v2 = self.views(image)
        return {
            "view1": normalize(v1, self.mean, self.std),
            "view2": normalize(v2, self.mean, self.std),
            "mask": mask_to_tensor(mask, self.size),
            "label": r.label,
            "group": group_of_record(r),
            "key": r.key,
        }


class MixedIndexBatches(Sampler):
    """Endless index batches with ``n_abnormal`` abnormal items and the rest normal, drawn at
    random (seeded): the composition of ``pipeline.data.MixedBatches``."""

    def __init__(self, labels: list[int], batch: int, n_abnormal: int, seed: int):
        self.abnormal = [i for i, y in enumerate(labels) if y]
        self.normal = [i for i, y in enumerate(labels) if not y]
        self.batch, self.n_abnormal, self.seed = batch, n_abnormal, seed

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed)
        while True:
            a = rng.choice(self.abnormal, self.n_abnormal).tolist()
            yield a + rng.choice(self.normal, self.batch - self.n_abnormal).tolist()


class FileReferences:
    """The released references: per sample, K normal images of its group read from the source
    files, decoded, resized and encoded by the backbone in one call per sample. Has the worker
    bank's ``draw`` signature, so ``Step.residuals`` matches against it unchanged; like the bank,
    it never draws the sample itself."""

    device = torch.device("cpu")

    def __init__(self, normals: dict[str, list[tuple[str, str]]], backbone, size: int):
        self.normals, self.backbone, self.size = normals, backbone, size

    def _one(self, group: str, k: int, generator: torch.Generator, exclude: str) -> list[Tensor]:
        urls = [url for key, url in self.normals[group] if key != exclude]
        pick = torch.randperm(len(urls), generator=generator)[:k].tolist()
        x = torch.stack([
            normalize(image_to_tensor(decode_image(storage.read_bytes(urls[i])), self.size),
                      self.backbone.mean, self.backbone.std)
            for i in pick
        ])
        return [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in self.backbone(x)]

    def draw(self, groups: list[str], keys: list[str], k: int, generator: torch.Generator) -> list[Tensor]:
        per_sample = [self._one(g, k, generator, key) for g, key in zip(groups, keys)]
        return [torch.stack(level) for level in zip(*per_sample)]


class TimedReferences:
    """Wraps a reference source and adds up the seconds spent in its ``draw``."""

    def __init__(self, inner):
        self.inner, self.seconds, self.device = inner, 0.0, inner.device

    def draw(self, groups: list[str], keys: list[str], k: int, generator: torch.Generator) -> list[Tensor]:
        t = time.perf_counter()
        out = self.inner.draw(groups, keys, k, generator)
        self.seconds += time.perf_counter() - t
        return out


# ----------------------------------------------------------------------------- the loops


class Autocast(nn.Module):
    """The projector with bf16 autocast around its forward pass (fp32 weights), as the
    training engine runs it when the precision is bf16."""

    def __init__(self, module: nn.Module, enabled: bool):
        super().__init__()
        self.module, self.enabled = module, enabled

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.enabled):
            return self.module(feats)


@dataclass
class Totals:
    """Seconds per phase, summed over the timed steps."""

    steps: int = 0
    samples: int = 0
    skipped: int = 0
    data: float = 0.0
    refs: float = 0.0
    features: float = 0.0
    update: float = 0.0
    bound: float = 0.0  # the backbone alone on the same two views, measured after each step

    @property
    def seconds(self) -> float:
        return self.data + self.refs + self.features + self.update

    @property
    def speed(self) -> float:
        """Training samples/s."""
        return self.samples / self.seconds

    @property
    def inputs_speed(self) -> float:
        """Samples/s of everything before the projector: loader, references, backbone, matching."""
        return self.samples / (self.seconds - self.update)

    @classmethod
    def sum(cls, parts: list["Totals"]) -> "Totals":
        out = cls()
        for p in parts:
            for name in ("steps", "samples", "skipped", "data", "refs", "features", "update", "bound"):
                setattr(out, name, getattr(out, name) + getattr(p, name))
        return out


class Loop:
    """One training loop: where its batches and references come from, and its own projector
    and optimizer (same initialisation for both loops)."""

    def __init__(self, name: str, cfg: Config, backbone, references, centers: list[Tensor],
                 batches: Callable[[int], Iterator[dict]]):
        from pipeline.projector import Projector
        from pipeline.train import Step

        self.name, self.cfg, self.batches = name, cfg, batches
        self.refs = TimedReferences(references)
        self.step_math = Step(cfg, backbone, self.refs, centers)
        torch.manual_seed(cfg.seed)
        self.projector = Projector.from_spec(backbone.widths, cfg.projector)
        self.model = Autocast(self.projector, cfg.train.deepspeed.precision == "bf16")
        self.optimizer = torch.optim.Adam(self.projector.parameters(), lr=cfg.train.lr,
                                          weight_decay=cfg.train.weight_decay)
        self.rounds: list[Totals] = []

    def run(self, round_index: int, first_step: int, warmup: int, steps: int) -> Totals:
        """``warmup`` untimed then ``steps`` timed steps on a fresh loader; returns this round's totals."""
        from pipeline.train import choose_k, draw_generator

        cfg = self.cfg
        it = self.batches(round_index)
        out = Totals()
        try:
            for i in range(warmup + steps):
                step = first_step + i
                t0 = time.perf_counter()
                batch = next(it)
                t1 = time.perf_counter()
                k = choose_k(cfg, step)
                gen = draw_generator(cfg, step, 0)
                self.refs.seconds = 0.0
                with torch.no_grad():
                    r1, r2 = self.step_math.residuals(batch, k, gen)
                t2 = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                total, _ = self.step_math.loss(self.model, r1, r2, batch["mask"])
                total.backward()
                if cfg.train.deepspeed.grad_clip:
                    nn.utils.clip_grad_norm_(self.projector.parameters(), cfg.train.deepspeed.grad_clip)
                self.optimizer.step()
                t3 = time.perf_counter()
                if not torch.isfinite(total):
                    raise RuntimeError(f"{self.name}: loss is {float(total)} at step {step}")
                if i < warmup:
                    continue
                out.steps += 1
                out.samples += len(batch["group"])
                out.skipped += int(batch.get("skipped_batches", 0))
                out.data += t1 - t0
                out.refs += self.refs.seconds
                out.features += t2 - t1 - self.refs.seconds
                out.update += t3 - t2
                out.bound += self.backbone_bound(batch)
        finally:
            del it  # the last reference: its loader processes shut down
            gc.collect()
        self.rounds.append(out)
        return out


    def backbone_bound(self, batch: dict) -> float:
        """Seconds of the frozen backbone alone on the step's two views: the floor of a step."""
        backbone = self.step_math.backbone
        t0 = time.perf_counter()
        with torch.no_grad():
            backbone(batch["view1"])
            backbone(batch["view2"])
        return time.perf_counter() - t0


def ours_batches(cfg: Config, backbone) -> Callable[[int], Iterator[dict]]:
    from pipeline.data import train_loader

    def make(round_index: int) -> Iterator[dict]:
        return iter(train_loader(cfg, backbone.mean, backbone.std, backbone.grid, rank=0, restart=round_index))

    return make


def released_batches(cfg: Config, backbone, records: list[SampleRecord]) -> Callable[[int], Iterator[dict]]:
    size, lc = cfg.backbone.image_size, cfg.loss
    ds = FileImages(records, size, backbone.mean, backbone.std, cfg.data.augment)
    n_abnormal = max(1, round(cfg.data.batch_size * cfg.data.abnormal_fraction))

    def make(round_index: int) -> Iterator[dict]:
        sampler = MixedIndexBatches([r.label for r in records], cfg.data.batch_size, n_abnormal,
                                    seed=cfg.seed * 1000 + round_index)
        w = cfg.data.loader_workers
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=w, prefetch_factor=2 if w else None)
        return with_negatives(iter(loader))

    def with_negatives(raw: Iterator[dict]) -> Iterator[dict]:
        """Skip batches without any abnormal patch, as the released loop does."""
        skipped = 0
        for batch in raw:
            if not patch_labels(batch["mask"], backbone.grid, lc.angle_labels, lc.angle_pixel_threshold).any():
                skipped += 1
                continue
            yield {**batch, "skipped_batches": skipped}
            skipped = 0

    return make
