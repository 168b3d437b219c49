"""The reference-bank and centers stages (METHOD.md §2), between shards and pretraining.

Reference bank: for every (source, class, view) of the pretraining shards, a fixed,
seeded choice of ``refbank.per_group`` normal images is encoded once by the frozen
backbone and stored next to the shards. The choice keeps, per group, the images with the
smallest seeded hash of their key: one pass over the normal shards, independent of shard
order and of the number of shards, and stable when data is added.

Centers: the mean residual of normal patches per level, with K = ``centers.k`` references
drawn from the bank, summed over Ray tasks (one per shard subset) and reduced.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict

import torch
from tqdm import tqdm

from pipeline.config import Config
from pipeline.errors import DataError
from shards import storage

log = logging.getLogger(__name__)


def refbank_url(cfg: Config, backbone_id: str) -> str:
    return storage.join(cfg.shards.url, "refbank", backbone_id)


def centers_url(cfg: Config, backbone_id: str) -> str:
    return storage.join(cfg.shards.url, "centers", f"{backbone_id}.safetensors")


def _rank_key(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def _pretrain_normal_urls(cfg: Config) -> list[str]:
    from shards.build import read_manifest, shard_urls

    manifest = read_manifest(cfg.shards.url)
    urls = [u for s in cfg.sources_with("pretrain")
            for u in shard_urls(manifest, cfg.shards.url, source=s.name, split="pretrain", stream="normal")]
    if not urls:
        raise DataError(f"no normal pretraining shards under {cfg.shards.url}: run `adpretrain build-shards` first")
    return urls


def _encode(backbone, images: list[torch.Tensor], batch: int = 16) -> list[torch.Tensor]:
    """Normalised (3, S, S) images -> per level (N, C, h, w) features."""
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    outs: list[list[torch.Tensor]] = []
    for i in range(0, len(images), batch):
        x = torch.stack(images[i : i + batch]).to(device)
        outs.append([f.cpu() for f in backbone(x)])
    return [torch.cat(level) for level in zip(*outs)]


def build_refbank(cfg: Config, progress: bool = False, backbone=None) -> str:
    """Encode the reference bank unless a complete one exists. Returns its URL."""
    from pipeline.backbone import build_backbone
    from pipeline.data import group_of, iter_decoded
    from pipeline.residual import RefBankStore
    from pipeline.transforms import normalize

    backbone = backbone or build_backbone(cfg.backbone)
    url = refbank_url(cfg, backbone.id)
    store = RefBankStore(url, cfg.refbank.cache_groups)
    if store.exists():
        log.info("reference bank exists at %s: skipped", url)
        return url
    m, seed = cfg.refbank.per_group, cfg.refbank.seed
    chosen: dict[str, list[tuple[int, str, torch.Tensor]]] = defaultdict(list)

    def want(key: str, meta: dict) -> bool:  # decode only images that enter their group's M smallest
        g = chosen[group_of(meta)]
        return len(g) < m or _rank_key(seed, key) < g[-1][0]

    for d in tqdm(iter_decoded(_pretrain_normal_urls(cfg), cfg.backbone.image_size, want=want),
                  desc="refbank: scan", unit="img", disable=not progress):
        g = chosen[group_of(d.meta)]
        g.append((_rank_key(seed, d.key), d.key, d.image))
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
    })
    log.info("reference bank: %d groups x %d images at %s", len(chosen), m, url)
    return url


def _centers_task(cfg_dict: dict, urls: list[str], max_images: int, task: int) -> tuple[list, list]:
    """Sum and count of normal residuals per level over ``urls`` (one Ray task)."""
    from pipeline.backbone import build_backbone
    from pipeline.config import validate
    from pipeline.data import group_of, iter_decoded
    from pipeline.residual import CenterAccumulator, RefBankStore, match_residual
    from pipeline.transforms import normalize

    cfg = validate(cfg_dict)
    torch.set_num_threads(1)
    backbone = build_backbone(cfg.backbone)
    store = RefBankStore(refbank_url(cfg, backbone.id), cfg.refbank.cache_groups)
    acc = CenterAccumulator(backbone.widths)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + task)
    batch: list = []

    def flush() -> None:
        x = torch.stack([normalize(d.image, backbone.mean, backbone.std) for d in batch])
        feats = backbone(x)
        banks = [torch.stack(lv) for lv in zip(*(store.draw(group_of(d.meta), cfg.centers.k, gen, exclude=d.key) for d in batch))]
        res = [match_residual(f, b, cfg.refbank.match_chunk) for f, b in zip(feats, banks)]
        normal = torch.ones(len(batch), backbone.grid, backbone.grid, dtype=torch.bool)
        acc.add(res, [normal] * len(res))
        batch.clear()

    for i, d in enumerate(iter_decoded(urls, cfg.backbone.image_size)):
        if i >= max_images:
            break
        batch.append(d)
        if len(batch) == 16:
            flush()
    if batch:
        flush()
    return [s.tolist() for s in acc.sums], acc.counts.tolist()


def compute_centers(cfg: Config, progress: bool = False, backbone=None) -> str:
    """Mean normal residual per level, summed over Ray tasks. Returns the centers' URL."""
    import ray

    from pipeline.backbone import build_backbone
    from pipeline.rayctx import init_ray
    from pipeline.residual import CenterAccumulator, save_centers

    backbone = backbone or build_backbone(cfg.backbone)
    url = centers_url(cfg, backbone.id)
    if storage.exists(url):
        log.info("centers exist at %s: skipped", url)
        return url
    build_refbank(cfg, progress=progress, backbone=backbone)
    urls = _pretrain_normal_urls(cfg)
    init_ray(cfg.ray)
    n_tasks = max(1, min(len(urls), int(ray.cluster_resources().get("CPU", 1))))
    parts = [urls[i::n_tasks] for i in range(n_tasks)]
    per_task = -(-cfg.centers.max_images // n_tasks)
    task = ray.remote(num_cpus=1)(_centers_task)
    refs = [task.remote(cfg.to_dict(), p, per_task, i) for i, p in enumerate(parts)]
    acc = CenterAccumulator(backbone.widths)
    for sums, counts in tqdm((ray.get(r) for r in refs), total=len(refs), desc="centers", disable=not progress):
        acc.merge([torch.tensor(s, dtype=torch.float64) for s in sums], torch.tensor(counts, dtype=torch.float64))
    save_centers(url, acc.centers(), backbone.id, {"k": cfg.centers.k, "images": cfg.centers.max_images})
    log.info("centers of %d levels at %s", len(backbone.widths), url)
    return url
