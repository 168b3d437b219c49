"""The reference-bank stage (METHOD.md §2), between shards and centers.

For every (source, class, view) of the pretraining shards, a fixed, seeded choice of
``refbank.per_group`` normal images is encoded once by the frozen backbone and stored next
to the shards (:class:`pipeline.refbank.RefBankStore`). The choice keeps, per group, the
images with the smallest seeded hash of their key: one pass over the normal shards,
independent of shard order and of the number of shards, and stable when data is added.

The bank is keyed by what it is computed from: the sha256 of the shard manifest and its own
settings (:func:`pipeline.paths.refbank_inputs`) are hashed into its URL and kept in its
manifest, so after the shards or the settings change it is computed anew, never reused
stale. The shards' sizes are checked against their manifest, and the first shard that
cannot be read stops the stage.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import group_of, iter_decoded, rank_key
from pipeline.paths import refbank_inputs, refbank_url
from pipeline.refbank import RefBankStore
from pipeline.stages import Context
from pipeline.transforms import normalize
from shards.errors import DataError
from shards.manifest import check_shard_sizes, read_manifest, shard_counts

log = logging.getLogger(__name__)

NAME = "refbank"
BATCH = 16  # images per backbone call


def pretrain_normal_shards(cfg: Config, manifest: dict) -> dict[str, int]:
    """URL -> sample count of the normal pretraining shards, checked against the manifest's sizes."""
    counts = {u: n for s in cfg.sources_with("pretrain")
              for u, n in shard_counts(manifest, cfg.shards.url, source=s.name, split="pretrain", stream="normal").items()}
    if not counts:
        raise DataError(f"no normal pretraining shards under {cfg.shards.url}: run `adpretrain build-shards` first")
    check_shard_sizes(manifest, cfg.shards.url, list(counts))
    return counts


def done(cfg: Config, ctx: Context) -> bool:
    """A complete bank of the current inputs exists."""
    return RefBankStore(refbank_url(cfg, ctx.backbone(cfg.backbone).id)).exists()


def _choose(cfg: Config, progress: bool) -> dict[str, list[tuple[int, str, torch.Tensor]]]:
    """Per group, its ``refbank.per_group`` normal images of the smallest seeded rank:
    ``[(rank, key, image)]`` sorted by rank."""
    shards = pretrain_normal_shards(cfg, read_manifest(cfg.shards.url))
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
    return chosen


def _encode(backbone, images: list[torch.Tensor], batch: int = BATCH) -> list[torch.Tensor]:
    """Normalised (3, S, S) images -> per level (N, C, h, w) features."""
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    outs: list[list[torch.Tensor]] = []
    for i in range(0, len(images), batch):
        x = torch.stack(images[i : i + batch]).to(device)
        outs.append([f.cpu() for f in backbone(x)])
    return [torch.cat(level) for level in zip(*outs)]


def run(cfg: Config, ctx: Context) -> str:
    """Encode the reference bank unless a complete one of the same inputs exists. Returns its URL."""
    backbone = ctx.backbone(cfg.backbone)
    url = refbank_url(cfg, backbone.id)
    if done(cfg, ctx):
        log.info("reference bank exists at %s: skipped", url)
        return url
    store = RefBankStore(url, cfg.refbank.cache_groups)
    chosen = _choose(cfg, ctx.progress)
    for g in tqdm(sorted(chosen), desc="refbank: encode", unit="group", disable=not ctx.progress):
        items = chosen[g]
        feats = _encode(backbone, [normalize(t[2], backbone.mean, backbone.std) for t in items])
        store.write_group(g, feats, [t[1] for t in items])
    store.write_manifest({
        "backbone_id": backbone.id,
        "weights": backbone.weights_desc,
        "per_group": cfg.refbank.per_group,
        "seed": cfg.refbank.seed,
        "groups": len(chosen),
        "widths": list(backbone.widths),
        "grid": backbone.grid,
        "inputs": refbank_inputs(cfg, backbone.id),
    })
    log.info("reference bank: %d groups x %d images at %s", len(chosen), cfg.refbank.per_group, url)
    return url


def summary(url: str) -> str:
    return url
