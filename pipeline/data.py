"""Training batches streamed from WebDataset shards (local or s3://).

Every rank streams its own resampled shards (seeded per rank, loader worker and restart),
so the streams are endless and every rank yields exactly as many batches as the loop
asks for, whatever the shard counts: a rank can never run dry while another waits in a
collective. Each batch mixes the normal and the abnormal stream at a fixed ratio with at
least one abnormal image, and mixes the pretraining sources by their weights.
Corrupt samples and unreadable shards are skipped with a warning and counted in the batch
(``skipped``); a stream that skips more than ``data.max_skip_fraction`` of what it reads
stops the run. The stages that build from the shards once (reference bank, centers) read
them with ``strict=True`` instead: the first unreadable shard is an error.
Every reader first checks the shards' sizes against the manifest (:func:`shards.manifest.check_shard_sizes`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import Config
from shards.errors import DataError
from pipeline.transforms import (
    PhotometricViews,
    decode_image,
    decode_mask,
    image_to_tensor,
    mask_to_tensor,
    normalize,
    patch_labels,
)
from shards.manifest import check_shard_sizes, read_manifest, shard_urls
from shards.record import IMAGE_EXTS
from shards.storage import register_webdataset_schemes

register_webdataset_schemes()
log = logging.getLogger(__name__)


def rank_key(seed: int, key: str) -> int:
    """Seeded hash of a sample key: orders samples independently of shard order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def group_of(meta: dict) -> str:
    """Reference-bank group of a sample: (source, class, view)."""
    return f"{meta['source']}/{meta['class']}/{meta.get('view') or '-'}"


@dataclass
class Decoded:
    key: str
    image: torch.Tensor  # (3, S, S) float in [0, 1]
    mask: torch.Tensor  # (S, S) bool
    meta: dict


def decode_sample(sample: dict, size: int) -> Decoded:
    """A raw webdataset sample (bytes per extension) -> tensors. Raises on bad data."""
    meta = json.loads(sample["json"])
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')!r} holds no image")
    img = decode_image(sample[ext])
    mask = decode_mask(sample["mask.png"]) if "mask.png" in sample else None
    if mask is not None and mask.shape != img.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {img.shape[:2]} differ in size")
    return Decoded(sample["__key__"], image_to_tensor(img, size), mask_to_tensor(mask, size), meta)


def iter_decoded(urls: list[str], size: int, *, seed: int | None = None, shuffle: int = 0,
                 stats: dict | None = None, want: Callable[[str, dict], bool] | None = None,
                 strict: bool = False, expect: dict[str, int] | None = None) -> Iterator[Decoded]:
    """Decoded samples of ``urls``: resampled endlessly when ``seed`` is given, else each shard
    once in order. Corrupt samples and unreadable shards are skipped with a warning and counted
    in ``stats`` (``skipped``, and ``decoded`` for the samples yielded); with ``strict`` the first
    one is a DataError naming the shard instead.
    ``want(key, meta)``, when given, is asked before decoding: samples it declines are not decoded.
    ``expect``: the number of samples of each shard (the manifest's ``count``), checked when the
    shards have been read once: a shard that ends early (a corrupt tar header ends it without an
    error) is a DataError naming it."""
    if not urls:
        raise DataError("no shards to read: the selection of the manifest is empty")
    if seed is None:
        stages = [wds.SimpleShardList(urls)]
    else:
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True, worker_seed=lambda: 0)]
    stages.append(wds.tarfile_to_samples(handler=wds.reraise_exception if strict else _warn_and_count(stats)))
    if shuffle > 1:
        stages.append(wds.shuffle(shuffle, initial=min(shuffle, 100), rng=random.Random(seed)))
    seen: Counter[str] = Counter()
    try:
        for sample in wds.DataPipeline(*stages):
            seen[sample.get("__url__")] += 1
            try:
                if want is not None and not want(sample["__key__"], json.loads(sample["json"])):
                    continue
                decoded = decode_sample(sample, size)
            except Exception as e:  # corrupt bytes, truncated file, bad json: skip, count, go on
                if strict:
                    raise _unreadable(sample.get("__url__"), f"sample {sample.get('__key__')!r}: {e}") from None
                _count(stats, f"sample {sample.get('__key__')!r} from {sample.get('__url__')}: {e}")
                continue
            if stats is not None:
                stats["decoded"] = stats.get("decoded", 0) + 1
            yield decoded
    except DataError:
        raise
    except Exception as e:  # with strict only: the reader of a shard failed
        if not strict:
            raise
        url = next((a for a in reversed(e.args) if isinstance(a, str) and a in urls), None)
        raise _unreadable(url, f"{type(e).__name__}: {e.args[0] if e.args else e}") from None
    for url, n in (expect or {}).items():
        if seen[url] != n:
            raise _unreadable(url, f"{seen[url]} samples read, the manifest says {n}")


def _unreadable(url: str | None, what: str) -> DataError:
    return DataError(f"shard {url} cannot be read ({what}): it is truncated or corrupt. Delete it and rerun "
                     "`adpretrain build-shards CONFIG` to rewrite it")


def _count(stats: dict | None, what: str) -> None:
    log.warning("skipping corrupt data: %s", what)
    if stats is not None:
        stats["skipped"] = stats.get("skipped", 0) + 1


def _warn_and_count(stats: dict | None):
    def handler(exn: Exception) -> bool:
        _count(stats, f"{type(exn).__name__}: {exn}")
        return True

    return handler


@dataclass(frozen=True)
class StreamPlan:
    """Shard URLs per pretraining source and stream, and the sources' weights."""

    sources: tuple[str, ...]
    weights: tuple[float, ...]
    normal: tuple[tuple[str, ...], ...]
    abnormal: tuple[tuple[str, ...], ...]

    @classmethod
    def from_config(cls, cfg: Config, split: str = "pretrain") -> "StreamPlan":
        manifest = read_manifest(cfg.shards.url)
        names, weights, normal, abnormal = [], [], [], []
        for s in cfg.sources_with(split):
            n = shard_urls(manifest, cfg.shards.url, source=s.name, split=split, stream="normal")
            a = shard_urls(manifest, cfg.shards.url, source=s.name, split=split, stream="abnormal")
            if not n:
                raise DataError(f"source {s.name!r} has no normal shards in {cfg.shards.url}; rebuild the shards")
            check_shard_sizes(manifest, cfg.shards.url, n + a)
            names.append(s.name)
            weights.append(s.weight)
            normal.append(tuple(n))
            abnormal.append(tuple(a))
        if not any(abnormal):
            raise DataError(
                f"no {split} source has abnormal samples with masks in {cfg.shards.url}: the angle loss needs "
                "abnormal patches in every batch"
            )
        return cls(tuple(names), tuple(weights), tuple(normal), tuple(abnormal))


class MixedBatches(IterableDataset):
    """Endless batches: ``n_abnormal`` abnormal + the rest normal images, sources mixed by weight.

    Yields dicts: view1, view2 (B, 3, S, S) normalised; mask (B, S, S) bool; label (B,);
    group (list of reference-bank groups); key (sample keys); skipped (corrupt samples skipped since the last
    batch); too_small (abnormal samples passed over since the last batch, see ``_visible``).
    """

    def __init__(self, plan: StreamPlan, cfg: Config, mean, std, grid: int, rank: int, restart: int = 0):
        super().__init__()
        self.grid, self.loss = grid, cfg.loss
        self.plan, self.mean, self.std = plan, tuple(mean), tuple(std)
        self.size = cfg.backbone.image_size
        self.batch = cfg.data.batch_size
        self.n_abnormal = max(1, round(cfg.data.batch_size * cfg.data.abnormal_fraction))
        self.shuffle = cfg.data.shuffle_buffer
        self.augment = cfg.data.augment
        self.max_skip, self.skip_check_after = cfg.data.max_skip_fraction, cfg.data.skip_check_after
        self.seed = (cfg.seed, rank, restart)

    def _seed(self, *extra: int) -> int:
        wi = get_worker_info()
        return int(wds.utils.make_seed(*self.seed, wi.id if wi else 0, *extra)) % (2**31)

    def _mixed(self, streams: list[tuple[str, ...]], salt: int, stats: dict) -> Iterator[Decoded]:
        idx = [i for i, s in enumerate(streams) if s]
        its = {i: iter_decoded(list(streams[i]), self.size, seed=self._seed(salt, i), shuffle=self.shuffle,
                               stats=stats) for i in idx}
        w = np.array([self.plan.weights[i] for i in idx], dtype=float)
        rng = np.random.default_rng(self._seed(salt, 999))
        while True:
            yield next(its[idx[rng.choice(len(idx), p=w / w.sum())]])

    def _visible(self, items: Iterator[Decoded], stats: dict) -> Iterator[Decoded]:
        """Abnormal samples whose defect labels at least one patch for the angle loss; the
        others (defects too small for the patch grid) are passed over and counted, so every
        batch on every rank holds negatives."""
        for d in items:
            if patch_labels(d.mask[None], self.grid, self.loss.angle_labels, self.loss.angle_pixel_threshold).any():
                yield d
            else:
                stats["too_small"] += 1

    def _check_skipped(self, stats: dict) -> None:
        read = stats["decoded"] + stats["skipped"]
        if read >= self.skip_check_after and stats["skipped"] > self.max_skip * read:
            raise DataError(
                f"{stats['skipped']} of the {read} samples this training stream read were corrupt or unreadable, "
                f"more than data.max_skip_fraction={self.max_skip}; the warnings above name the shards: rewrite "
                "them with `adpretrain build-shards CONFIG` (delete the bad ones first), or raise data.max_skip_fraction"
            )

    def __iter__(self) -> Iterator[dict]:
        stats: dict = {"skipped": 0, "decoded": 0, "too_small": 0}
        normal = self._mixed(list(self.plan.normal), 0, stats)
        abnormal = self._visible(self._mixed(list(self.plan.abnormal), 1, stats), stats)
        views = PhotometricViews(self.size, self.augment)
        torch.manual_seed(self._seed(2))
        reported = (0, 0)
        while True:
            items = [next(abnormal) for _ in range(self.n_abnormal)]
            items += [next(normal) for _ in range(self.batch - self.n_abnormal)]
            self._check_skipped(stats)
            v1, v2 = zip(*(views(d.image) for d in items))
            yield {
                "view1": normalize(torch.stack(v1), self.mean, self.std),
                "view2": normalize(torch.stack(v2), self.mean, self.std),
                "mask": torch.stack([d.mask for d in items]),
                "label": torch.tensor([int(d.meta["label"]) for d in items]),
                "group": [group_of(d.meta) for d in items],
                "key": [d.key for d in items],
                # counts new since the previous batch
                "skipped": stats["skipped"] - reported[0],
                "too_small": stats["too_small"] - reported[1],
            }
            reported = (stats["skipped"], stats["too_small"])


def train_loader(cfg: Config, mean, std, grid: int, rank: int, restart: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """Batches of ``rank``; ``pin_memory`` for a CUDA worker, so batches reach the device without a sync."""
    plan = StreamPlan.from_config(cfg)
    ds = MixedBatches(plan, cfg, mean, std, grid, rank, restart)
    w = cfg.data.loader_workers
    return DataLoader(ds, batch_size=None, num_workers=w, persistent_workers=w > 0,
                      prefetch_factor=2 if w > 0 else None, pin_memory=pin_memory)
