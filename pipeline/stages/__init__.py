"""The stages of the chain, one module each, written one way.

    data -> shards -> refbank -> centers -> pretrain -> evaluate -> report

A stage module has

    NAME                       its name in `adpretrain run`'s table
    done(cfg, ctx) -> bool     its output is present and current (keyed by what it is computed from)
    run(cfg, ctx, **options)   writes its output and returns what it wrote
    summary(written) -> str    one line about what it wrote

``ctx`` (:class:`Context`) is what the stages of one invocation share: whether to show
progress, the frozen backbone (built once, on first use) and what earlier stages wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """What the stages of one invocation share."""

    progress: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)  # what each stage wrote, by NAME
    _backbones: dict[str, Any] = field(default_factory=dict, repr=False)

    def backbone(self, spec):
        """The frozen backbone of ``spec`` (a BackboneSpec), built on first use, then shared."""
        key = spec.model_dump_json()
        if key not in self._backbones:
            from pipeline.backbone import build_backbone

            self._backbones[key] = build_backbone(spec)
        return self._backbones[key]


# ---- the old pipeline/stages.py, moved out into refbank.py and centers.py ----
"""The reference-bank and centers stages (METHOD.md §2), between shards and pretraining.

Reference bank: for every (source, class, view) of the pretraining shards, a fixed,
seeded choice of ``refbank.per_group`` normal images is encoded once by the frozen
backbone and stored next to the shards. The choice keeps, per group, the images with the
smallest seeded hash of their key: one pass over the normal shards, independent of shard
order and of the number of shards, and stable when data is added.

Centers: the mean residual of normal patches per level over a sample of
``centers.max_images`` normal images spread evenly over every group (:func:`centers_quotas`).
A group's share of the sample is its images with the smallest hash of their key seeded by
``seed`` (another hash than the bank's), and every image's K = ``centers.k`` references are
drawn from the bank with a generator seeded by its key: Ray tasks (one per shard subset, on
a GPU when ``train.use_gpu``) return their best candidates per group and the driver keeps
the global best, so sample and centers are the same whatever the number of tasks.

Both are keyed by what they are computed from: the sha256 of the shard manifest and their
own settings (:func:`refbank_inputs`, :func:`centers_inputs`) are hashed into their URL and
kept in their metadata, so after the shards or the settings change they are computed anew,
never reused stale. Both stages check the shards' sizes against the manifest and fail on the
first shard they cannot read.
"""


import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import rank_key
from shards.errors import DataError, UserError
from shards import storage
from pipeline.paths import centers_inputs, centers_url, refbank_inputs, refbank_url

log = logging.getLogger(__name__)

BATCH = 16  # images per backbone call


def _pretrain_normal_shards(cfg: Config, manifest: dict) -> dict[str, int]:
    """URL -> sample count of the normal pretraining shards, checked against the manifest's sizes."""
    from shards.manifest import check_shard_sizes, shard_counts

    counts = {u: n for s in cfg.sources_with("pretrain")
              for u, n in shard_counts(manifest, cfg.shards.url, source=s.name, split="pretrain", stream="normal").items()}
    if not counts:
        raise DataError(f"no normal pretraining shards under {cfg.shards.url}: run `adpretrain build-shards` first")
    check_shard_sizes(manifest, cfg.shards.url, list(counts))
    return counts


def _encode(backbone, images: list[torch.Tensor], batch: int = BATCH) -> list[torch.Tensor]:
    """Normalised (3, S, S) images -> per level (N, C, h, w) features."""
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    outs: list[list[torch.Tensor]] = []
    for i in range(0, len(images), batch):
        x = torch.stack(images[i : i + batch]).to(device)
        outs.append([f.cpu() for f in backbone(x)])
    return [torch.cat(level) for level in zip(*outs)]


def build_refbank(cfg: Config, progress: bool = False, backbone=None) -> str:
    """Encode the reference bank unless a complete one of the same inputs exists. Returns its URL."""
    from pipeline.backbone import build_backbone
    from pipeline.data import group_of, iter_decoded
    from pipeline.residual import RefBankStore
    from pipeline.transforms import normalize
    from shards.manifest import read_manifest

    backbone = backbone or build_backbone(cfg.backbone)
    url = refbank_url(cfg, backbone.id)
    store = RefBankStore(url, cfg.refbank.cache_groups)
    if store.exists():
        log.info("reference bank exists at %s: skipped", url)
        return url
    shards = _pretrain_normal_shards(cfg, read_manifest(cfg.shards.url))
    m, seed = cfg.refbank.per_group, cfg.refbank.seed
    chosen: dict[str, list[tuple[int, str, torch.Tensor]]] = defaultdict(list)

    def want(key: str, meta: dict) -> bool:  # decode only images that enter their group's M smallest
        g = chosen[group_of(meta)]
        return len(g) < m or rank_key(seed, key) < g[-1][0]

    for d in tqdm(iter_decoded(list(shards), cfg.backbone.image_size, want=want, strict=True, expect=shards),
                  desc="refbank: scan", unit="img", disable=not progress):
        g = chosen[group_of(d.meta)]
        g.append((rank_key(seed, d.key), d.key, d.image))
        g.sort(key=lambda t: t[0])
        del g[m:]
    short = {g: len(v) for g, v in chosen.items() if len(v) < m}
    if short:
        raise DataError(
            f"refbank.per_group={m} but these groups have fewer normal images: {short}. "
            "Lower refbank.per_group or add normal images."
        )
    for g in tqdm(sorted(chosen), desc="refbank: encode", unit="group", disable=not progress):
        items = sorted(chosen[g], key=lambda t: t[0])
        feats = _encode(backbone, [normalize(t[2], backbone.mean, backbone.std) for t in items])
        store.write_group(g, feats, [t[1] for t in items])
    store.write_manifest({
        "backbone_id": backbone.id,
        "weights": backbone.weights_desc,
        "per_group": m,
        "seed": seed,
        "groups": len(chosen),
        "widths": list(backbone.widths),
        "grid": backbone.grid,
        "inputs": refbank_inputs(cfg, backbone.id),
    })
    log.info("reference bank: %d groups x %d images at %s", len(chosen), m, url)
    return url


def centers_quotas(cfg: Config, manifest: dict) -> dict[str, int]:
    """Images per group in the centers' sample: ``centers.max_images`` split evenly over the groups
    of normal pretraining images the manifest counts; what a small group lacks goes to the others."""
    from pipeline.data import group_of

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


def _centers_task(cfg_dict: dict, shards: dict[str, int], quotas: dict[str, int], bank_url: str) -> dict[str, list]:
    """Per group, the ``quotas[group]`` images of ``shards`` (URL -> sample count) with the smallest
    rank and the float64 sum and count of their normal residuals per level: ``[(rank, key, sums,
    counts)]`` (one Ray task)."""
    from pipeline.backbone import build_backbone
    from pipeline.config import validate
    from pipeline.data import group_of, iter_decoded
    from pipeline.devices import task_device
    from pipeline.residual import CenterAccumulator, RefBankStore, match_residual
    from pipeline.transforms import normalize

    cfg = validate(cfg_dict)
    device = task_device(cfg.train.use_gpu)
    torch.set_num_threads(1)
    backbone = build_backbone(cfg.backbone).to(device)
    store = RefBankStore(bank_url, cfg.refbank.cache_groups)
    chosen: dict[str, list[_Candidate]] = defaultdict(list)  # sorted by rank, at most the group's quota
    pending: list[_Candidate] = []
    normal = torch.ones(1, backbone.grid, backbone.grid, dtype=torch.bool, device=device)

    def rank(key: str) -> int:
        return rank_key(cfg.seed, f"centers:{key}")

    def want(key: str, meta: dict) -> bool:  # decode only images that enter their group's quota
        group = group_of(meta)
        q, g = quotas.get(group, 0), chosen[group]
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
        del g[quotas[c.group]:]
        pending.append(c)
        if len(pending) == BATCH:
            flush()
    flush()
    return {g: [(c.rank, c.key, c.sums, c.counts) for c in cands] for g, cands in chosen.items()}


def compute_centers(cfg: Config, progress: bool = False, backbone=None, tasks: int | None = None) -> str:
    """Mean normal residual per level over the centers' sample (see the module), computed by
    ``tasks`` Ray tasks (default: one per CPU, or per GPU with ``train.use_gpu``, at most one per
    shard) unless centers of the same inputs exist. Returns the centers' URL."""
    import ray

    from pipeline.backbone import build_backbone
    from pipeline.fanout import fan_out
    from pipeline.rayctx import init_ray
    from pipeline.residual import CenterAccumulator, save_centers
    from shards.manifest import read_manifest

    backbone = backbone or build_backbone(cfg.backbone)
    url = centers_url(cfg, backbone.id)
    if storage.exists(url):
        log.info("centers exist at %s: skipped", url)
        return url
    bank = build_refbank(cfg, progress=progress, backbone=backbone)
    manifest = read_manifest(cfg.shards.url)
    shards = _pretrain_normal_shards(cfg, manifest)
    urls = list(shards)
    quotas = centers_quotas(cfg, manifest)
    init_ray(cfg.ray)
    gpus = 1 if cfg.train.use_gpu else 0
    slots = int(ray.cluster_resources().get("GPU" if gpus else "CPU", 0))
    if gpus and not slots:
        raise UserError("train.use_gpu is true but the Ray cluster has no GPU for the centers' tasks; "
                        "start the Ray nodes with GPUs (`ray start --num-gpus N`) or set train.use_gpu=false")
    n_tasks = max(1, min(len(urls), tasks or slots))
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_centers_task)
    cfg_ref = ray.put(cfg.to_dict())
    parts = fan_out(range(n_tasks), lambda i: task.remote(cfg_ref, {u: shards[u] for u in urls[i::n_tasks]}, quotas, bank),
                    limit=n_tasks, desc="centers", progress=progress)
    best: dict[str, list] = defaultdict(list)
    for part in parts:
        for g, cands in part.items():
            best[g] = sorted(best[g] + cands, key=lambda c: c[0])[: quotas[g]]
    short = {g: f"{len(best[g])} of {q}" for g, q in quotas.items() if len(best[g]) < q}
    if short:
        raise DataError(f"the shards under {cfg.shards.url} hold fewer normal images than their manifest counts "
                        f"for groups {short}; rebuild them with `adpretrain build-shards CONFIG`")
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
