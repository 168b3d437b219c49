"""What an evaluation looks at: the sources, their shards, and the images of every class.

- the sources: the config's ``split: eval`` and ``split: val`` ones (or a named few of them);
- the shards of each source, checked against the manifest (sizes, before any task starts)
  and decoded once, whole: a shard that cannot be read whole is an error, never a class
  evaluated on part of its images;
- per class, a fixed, seeded K-shot reference set drawn from the class's normal training
  images (the K with the smallest seeded hash of their key: independent of shard order),
  the other normal training images as the fit set (the next ``eval.max_fit_images`` in the
  same order when set), the test images as the rest (capped by ``eval.max_test_images``,
  abnormal and normal kept in proportion).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import rank_key
from pipeline.evaluate.threads import one_thread
from shards.errors import DataError, UserError
from shards.manifest import check_shard_sizes, read_manifest, shard_counts
from shards.spec import SourceSpec

log = logging.getLogger(__name__)

NORMAL_SPLITS = ("train", "validation")  # original splits whose normal images are training images


@dataclass
class ShardImages:
    """One decoded shard (numpy, so Ray shares it without copies)."""

    keys: list[str]
    classes: list[str]
    splits: list[str]
    labels: np.ndarray  # (n,) int8
    has_mask: np.ndarray  # (n,) bool
    images: np.ndarray  # (n, 3, S, S) uint8
    masks: np.ndarray  # (n, S, S) bool


def decode_shard(url: str, count: int, size: int) -> ShardImages:
    """Decode every sample of one shard at ``size``; the manifest gives it ``count`` samples.

    A shard that cannot be read whole (a corrupt sample, a broken tar, fewer samples than
    the manifest's) is a DataError naming it: a class is never evaluated on part of its
    images. Images are kept as 8-bit values of the resized image, a quarter of the memory
    of float32."""
    from pipeline.data import iter_decoded

    keys, classes, splits, labels, has_mask, images, masks = [], [], [], [], [], [], []
    with one_thread():
        for d in iter_decoded([url], size, strict=True, expect={url: count}):
            keys.append(d.key)
            classes.append(str(d.meta["class"]))
            splits.append(str(d.meta["split"]))
            labels.append(int(d.meta["label"]))
            has_mask.append(bool(d.meta.get("has_mask", False)))
            images.append(d.image.mul(255.0).round_().to(torch.uint8).numpy())
            masks.append(d.mask.numpy())
    return ShardImages(
        keys, classes, splits, np.asarray(labels, dtype=np.int8), np.asarray(has_mask, dtype=bool),
        np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
        np.stack(masks) if masks else np.zeros((0, size, size), bool),
    )


@dataclass(frozen=True)
class ClassPlan:
    """One class of one source, and how to pick its images."""

    source: str
    role: str  # eval | val
    cls: str
    masks: bool  # False for `masks: none` sources
    k_shot: int
    seed: int
    max_test: int | None
    max_fit: int | None = None


@dataclass
class ClassImages:
    refs: list[str]
    ref_images: torch.Tensor  # (K, 3, S, S) float [0, 1]
    fit_images: torch.Tensor  # (N_fit, 3, S, S) uint8
    test_keys: list[str]
    test_images: torch.Tensor  # (N_test, 3, S, S) uint8
    labels: np.ndarray  # (N_test,)
    masks: np.ndarray  # (N_test, S, S) bool
    pixel_ok: bool


def select_images(plan: ClassPlan, shards: Sequence[ShardImages]) -> ClassImages:
    """References, fit set and test set of ``plan.cls`` from the decoded shards of its source."""
    items = [(rank_key(plan.seed, s.keys[i]), si, i) for si, s in enumerate(shards)
             for i in range(len(s.keys)) if s.classes[i] == plan.cls]
    items.sort()
    normal_train = [t for t in items if shards[t[1]].splits[t[2]] in NORMAL_SPLITS and shards[t[1]].labels[t[2]] == 0]
    test = [t for t in items if shards[t[1]].splits[t[2]] == "test"]
    where = f"source {plan.source!r}, class {plan.cls!r}"
    if len(normal_train) < plan.k_shot + 1:
        raise DataError(
            f"{where}: {len(normal_train)} normal training images, but eval.k_shot={plan.k_shot} references "
            "plus at least one image to fit the methods are needed; lower eval.k_shot or add normal images"
        )
    labels_all = [int(shards[si].labels[i]) for _, si, i in test]
    if not any(labels_all) or all(labels_all):
        raise DataError(f"{where}: the test images must hold both normal and abnormal images "
                        f"({sum(labels_all)} abnormal of {len(test)})")
    if plan.max_test is not None and len(test) > plan.max_test:
        abn = [t for t, y in zip(test, labels_all) if y]
        nor = [t for t, y in zip(test, labels_all) if not y]
        n_abn = min(len(abn), max(1, round(plan.max_test * len(abn) / len(test))), plan.max_test - 1)
        test = abn[:n_abn] + nor[: plan.max_test - n_abn]
    refs, fit = normal_train[: plan.k_shot], normal_train[plan.k_shot :]
    if plan.max_fit is not None:
        fit = fit[: plan.max_fit]  # the first in the seeded order, as the references
    by_key = lambda ts: sorted(ts, key=lambda t: shards[t[1]].keys[t[2]])  # noqa: E731
    refs, fit, test = by_key(refs), by_key(fit), by_key(test)

    def stack(ts: list, attr: str) -> np.ndarray:
        return np.stack([getattr(shards[si], attr)[i] for _, si, i in ts])

    labels = np.asarray([int(shards[si].labels[i]) for _, si, i in test], dtype=np.int64)
    has_mask = np.asarray([bool(shards[si].has_mask[i]) for _, si, i in test])
    pixel_ok = plan.masks and bool(has_mask[labels == 1].all())
    if plan.masks and not pixel_ok:
        log.warning("%s: %d of %d abnormal test images have no mask: pixel metrics are n/a", where,
                    int((~has_mask[labels == 1]).sum()), int((labels == 1).sum()))
    return ClassImages(
        refs=[shards[si].keys[i] for _, si, i in refs],
        ref_images=torch.from_numpy(stack(refs, "images")).float().div_(255.0),
        fit_images=torch.from_numpy(stack(fit, "images")),
        test_keys=[shards[si].keys[i] for _, si, i in test],
        test_images=torch.from_numpy(stack(test, "images")),
        labels=labels,
        masks=stack(test, "masks"),
        pixel_ok=pixel_ok,
    )


def select_sources(cfg: Config, names: Sequence[str] | None) -> list[SourceSpec]:
    """The eval/val sources of the config, or those of them named in ``names``."""
    usable = [s for s in cfg.sources if s.split in ("eval", "val")]
    if names is None:
        chosen = usable
    else:
        by_name = {s.name: s for s in usable}
        bad = [n for n in names if n not in by_name]
        if bad:
            raise UserError(f"sources {bad} are not eval/val sources of the config; choose from {sorted(by_name)}")
        chosen = [by_name[n] for n in names]
    if not chosen:
        raise UserError("the config has no source with split: eval or split: val; add one to evaluate on")
    return chosen


def _class_plans(cfg: Config, src: SourceSpec, manifest: dict) -> list[ClassPlan]:
    entry = manifest["sources"].get(src.name)
    if entry is None or entry.get("split") != src.split:
        raise DataError(f"source {src.name!r} (split: {src.split}) is not in the shards at {cfg.shards.url!r}: "
                        "run `adpretrain build-shards CONFIG` again")
    e = cfg.eval
    return [ClassPlan(src.name, src.split, cls, src.masks != "none", e.k_shot, e.seed, e.max_test_images,
                      e.max_fit_images) for cls in sorted(entry["classes"])]


Work = list[tuple[SourceSpec, list[tuple[str, int]], list[ClassPlan]]]
"""Per source: its shards (URL, samples the manifest lists) and its classes."""


def plan_work(cfg: Config, srcs: Sequence[SourceSpec]) -> Work:
    """The shards and classes of every source, its shards' sizes checked against the manifest."""
    manifest = read_manifest(cfg.shards.url)
    work = []
    for s in srcs:
        plans = _class_plans(cfg, s, manifest)
        counts = shard_counts(manifest, cfg.shards.url, source=s.name, split=s.split)
        if not counts or not plans:
            raise DataError(f"source {s.name!r} has no shards or no classes in {cfg.shards.url!r}; rebuild the shards")
        work.append((s, list(counts.items()), plans))
    check_shard_sizes(manifest, cfg.shards.url, [u for _, shards_of, _ in work for u, _ in shards_of])
    return work
