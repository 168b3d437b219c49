"""The centers stage (METHOD.md §2), between the reference bank and pretraining.

The centers are the mean residual of normal patches per level over a sample of
``centers.max_images`` normal images spread evenly over every group (:func:`quotas`). A
group's share of the sample is its images with the smallest hash of their key seeded by
``seed`` (another hash than the bank's), and every image's K = ``centers.k`` references are
drawn from the bank with a generator seeded by its key: Ray tasks (one per shard subset, on
a GPU when ``train.use_gpu``) return their best candidates per group and the driver keeps
the global best, so sample and centers are the same whatever the number of tasks.

The centers are keyed by what they are computed from: the sha256 of the shard manifest, the
bank's and their own settings (:func:`pipeline.paths.centers_inputs`) are hashed into their
URL and kept in their metadata, so after the shards or the settings change they are computed
anew, never reused stale. The reference bank is built first when it is missing; the shards'
sizes are checked against their manifest, and the first shard that cannot be read stops the
stage. The file format is :mod:`pipeline.centers`'.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.backbone import build_backbone
from pipeline.centers import CenterAccumulator, save_centers
from pipeline.config import Config, validate
from pipeline.data import group_of, iter_decoded, rank_key
from pipeline.devices import task_device
from pipeline.hostmem import retain_freed_memory
from pipeline.matching import match_residual
from pipeline.paths import centers_inputs, centers_url
from pipeline.refbank import RefBankStore
from pipeline.stages import Context, refbank
from pipeline.stages.refbank import BATCH, pretrain_normal_shards
from shards import storage
from shards.errors import DataError, UserError
from pipeline.transforms import normalize
from shards.manifest import read_manifest

log = logging.getLogger(__name__)

NAME = "centers"


def done(cfg: Config, ctx: Context) -> bool:
    """Centers of the current inputs exist."""
    return storage.exists(centers_url(cfg, ctx.backbone(cfg.backbone).id))


def quotas(cfg: Config, manifest: dict) -> dict[str, int]:
    """Images per group in the centers' sample: ``centers.max_images`` split evenly over the groups
    of normal pretraining images the manifest counts; what a small group lacks goes to the others."""
    pretrain = {s.name for s in cfg.sources_with("pretrain")}
    sizes: Counter[str] = Counter()
    for row in manifest["counts"]:
        if row["source"] in pretrain and not row["label"]:
            sizes[group_of(row)] += row["count"]
    quota = dict.fromkeys(sizes, 0)
    left, open_groups = cfg.centers.max_images, sorted(sizes)
    while left and open_groups:
        share, extra = divmod(left, len(open_groups))
        for i, g in enumerate(open_groups):
            add = min(share + (i < extra), sizes[g] - quota[g])
            quota[g] += add
            left -= add
        open_groups = [g for g in open_groups if quota[g] < sizes[g]]
    return quota


@dataclass(eq=False)
class _Candidate:
    """An image of the centers' sample as far as one task knows: decoded, then its residual sums."""

    rank: int
    key: str
    group: str
    image: torch.Tensor | None
    sums: list[np.ndarray] | None = None
    counts: np.ndarray | None = None


def _centers_task(cfg_dict: dict, shards: dict[str, int], quota: dict[str, int], bank_url: str) -> dict[str, list]:
    """Per group, the ``quota[group]`` images of ``shards`` (URL -> sample count) with the smallest
    rank and the float64 sum and count of their normal residuals per level: ``[(rank, key, sums,
    counts)]`` (one Ray task)."""
    cfg = validate(cfg_dict)
    device = task_device(cfg.train.use_gpu)
    torch.set_num_threads(1)
    retain_freed_memory()
    backbone = build_backbone(cfg.backbone).to(device)
    store = RefBankStore(bank_url, cfg.refbank.cache_groups)
    chosen: dict[str, list[_Candidate]] = defaultdict(list)  # sorted by rank, at most the group's quota
    pending: list[_Candidate] = []
    normal = torch.ones(1, backbone.grid, backbone.grid, dtype=torch.bool, device=device)

    def rank(key: str) -> int:
        return rank_key(cfg.seed, f"centers:{key}")

    def want(key: str, meta: dict) -> bool:  # decode only images that enter their group's quota
        group = group_of(meta)
        q, g = quota.get(group, 0), chosen[group]
        return q > 0 and (len(g) < q or rank(key) < g[-1].rank)

    def flush() -> None:
        live = [c for c in pending if c in chosen[c.group]]  # the others lost their place meanwhile
        pending.clear()
        if not live:
            return
        x = torch.stack([normalize(c.image, backbone.mean, backbone.std) for c in live]).to(device)
        refs = [store.draw(c.group, cfg.centers.k, torch.Generator().manual_seed(rank_key(cfg.seed, f"refs:{c.key}")),
                           exclude=c.key) for c in live]
        banks = [torch.stack(level).to(device) for level in zip(*refs)]
        res = [match_residual(f, b, cfg.refbank.match_chunk) for f, b in zip(backbone(x), banks)]
        for i, c in enumerate(live):
            acc = CenterAccumulator(backbone.widths)
            acc.add([r[i : i + 1] for r in res], [normal] * len(res))
            c.sums, c.counts, c.image = [s.numpy() for s in acc.sums], acc.counts.numpy(), None

    for d in iter_decoded(list(shards), cfg.backbone.image_size, want=want, strict=True, expect=shards):
        c = _Candidate(rank(d.key), d.key, group_of(d.meta), d.image)
        g = chosen[c.group]
        g.append(c)
        g.sort(key=lambda t: t.rank)
        del g[quota[c.group]:]
        pending.append(c)
        if len(pending) == BATCH:
            flush()
    flush()
    return {g: [(c.rank, c.key, c.sums, c.counts) for c in cands] for g, cands in chosen.items()}


def _sample(cfg: Config, bank_url: str, tasks: int | None, progress: bool) -> dict[str, list]:
    """The centers' sample with its residual sums, per group ``[(rank, key, sums, counts)]`` by rank,
    from ``tasks`` Ray tasks over the normal pretraining shards."""
    import ray

    from pipeline.fanout import fan_out
    from pipeline.rayctx import init_ray

    manifest = read_manifest(cfg.shards.url)
    shards = pretrain_normal_shards(cfg, manifest)
    urls = list(shards)
    quota = quotas(cfg, manifest)
    init_ray(cfg.ray)
    gpus = 1 if cfg.train.use_gpu else 0
    slots = int(ray.cluster_resources().get("GPU" if gpus else "CPU", 0))
    if gpus and not slots:
        raise UserError("train.use_gpu is true but the Ray cluster has no GPU for the centers' tasks; "
                        "start the Ray nodes with GPUs (`ray start --num-gpus N`) or set train.use_gpu=false")
    n_tasks = max(1, min(len(urls), tasks or slots))
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_centers_task)
    cfg_ref = ray.put(cfg.to_dict())
    parts = fan_out(range(n_tasks), lambda i: task.remote(cfg_ref, {u: shards[u] for u in urls[i::n_tasks]}, quota, bank_url),
                    limit=n_tasks, desc="centers", progress=progress)
    best: dict[str, list] = defaultdict(list)
    for part in parts:
        for g, cands in part.items():
            best[g] = sorted(best[g] + cands, key=lambda c: c[0])[: quota[g]]
    short = {g: f"{len(best[g])} of {q}" for g, q in quota.items() if len(best[g]) < q}
    if short:
        raise DataError(f"the shards under {cfg.shards.url} hold fewer normal images than their manifest counts "
                        f"for groups {short}; rebuild them with `adpretrain build-shards CONFIG`")
    return best


def run(cfg: Config, ctx: Context, tasks: int | None = None) -> str:
    """Mean normal residual per level over the centers' sample (see the module), computed by
    ``tasks`` Ray tasks (default: one per CPU, or per GPU with ``train.use_gpu``, at most one per
    shard) unless centers of the same inputs exist. Returns the centers' URL."""
    backbone = ctx.backbone(cfg.backbone)
    url = centers_url(cfg, backbone.id)
    if done(cfg, ctx):
        log.info("centers exist at %s: skipped", url)
        return url
    best = _sample(cfg, refbank.run(cfg, ctx), tasks, ctx.progress)
    acc = CenterAccumulator(backbone.widths)
    for g in sorted(best):
        for _, _, sums, counts in best[g]:
            acc.merge([torch.tensor(s) for s in sums], torch.tensor(counts))
    sample = {g: [c[1] for c in best[g]] for g in sorted(best)}
    save_centers(url, acc.centers(), backbone.id, {
        "k": cfg.centers.k, "images": sum(map(len, sample.values())), "sample": sample,
        "inputs": centers_inputs(cfg, backbone.id),
    })
    log.info("centers of %d levels from %d images of %d groups at %s", len(backbone.widths),
             sum(map(len, sample.values())), len(sample), url)
    return url


def summary(url: str) -> str:
    return url
