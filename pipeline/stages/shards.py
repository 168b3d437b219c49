"""The shards stage: pack the configured sources into WebDataset shards under ``shards.url``.

Synthetic sources whose root is missing are generated first (:mod:`shards.synth`); then
:mod:`shards.build` scans and plans, the shards not yet committed are written as Ray tasks
(one per shard, at most ``shards.tasks`` at once, through :func:`pipeline.fanout.fan_out`),
and the manifest is written last. Idempotent: a rerun writes only what is missing, and
nothing at all when the shards and manifest are complete. The stage is done when every
shard of today's plan is committed and the manifest on storage is the one they make.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

from pipeline.config import Config
from pipeline.stages import Context
from shards import storage
from shards.build import Build, ShardStore, clean, is_current, make_manifest, prepare, write_manifest
from shards.synth import generate_missing, needs_generating
from shards.writer import ShardPlan, write_shard

log = logging.getLogger(__name__)

NAME = "shards"


def done(cfg: Config, ctx: Context) -> bool:
    """The manifest on storage is the one today's sources and settings make, every shard committed."""
    store = ShardStore(cfg.shards.url)
    if any(needs_generating(s) for s in cfg.sources) or not storage.exists(store.manifest_url):
        return False
    build = prepare(cfg.sources, cfg.shards)
    return is_current(build, store)


def run(cfg: Config, ctx: Context) -> dict[str, Any]:
    """Build (or finish, or confirm) the shards of ``cfg.sources`` under ``cfg.shards.url``.

    Returns the manifest (as written to ``{url}/manifest.json``) with one extra key,
    ``build``, holding this run's timings (also in ``build-info.json``; kept out of the
    manifest so that it stays deterministic).
    """
    t0 = time.time()
    store = ShardStore(cfg.shards.url)
    had_manifest = storage.exists(store.manifest_url)  # the store answers
    if not had_manifest:
        store.ensure_writable()  # a new build: fail now, not after scanning, if it cannot be written
    generate_missing(cfg.sources)
    build = prepare(cfg.sources, cfg.shards)
    t_write = _write(cfg, ctx, build, store, had_manifest)
    t_done = time.time()
    manifest = make_manifest(cfg.shards, build.scans, build.plans, build.sides)
    info = _build_info(build, t0, t_write, t_done)
    write_manifest(build, store, manifest, info)
    return {**manifest, "build": info}


def summary(manifest: dict[str, Any]) -> str:
    t = manifest["totals"]
    return f"{t['normal'] + t['abnormal']} samples in {len(manifest['shards'])} shards, {t['quarantined']} quarantined"


def _write(cfg: Config, ctx: Context, build: Build, store: ShardStore, had_manifest: bool) -> float:
    """Clean what an earlier build left and write the shards still to write; when writing began."""
    if not build.todo:
        clean(store.url, build.scans, build.plans)
        return time.time()
    from pipeline.rayctx import init_ray

    store.ensure_writable()
    if had_manifest:
        storage.remove(store.manifest_url)  # it no longer describes what is on storage
    n, todo = len(build.plans), len(build.todo)
    log.info("%d of %d shards to write (%d already committed)", todo, n, n - todo)
    clean(store.url, build.scans, build.plans)
    init_ray(cfg.ray)
    t_write = time.time()
    build.sides.update(_run_on_ray(build.todo, store.url, cfg.shards.tasks, ctx.progress))
    return t_write


def _run_on_ray(todo: list[ShardPlan], url: str, tasks: int | None, progress: bool) -> dict[str, dict]:
    """Write the shards as Ray tasks, at most ``tasks`` (default: the cluster's CPUs) at once; sidecars by shard path."""
    import ray

    from pipeline.fanout import fan_out

    task = ray.remote(num_cpus=1)(write_shard)
    limit = tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    sidecars = fan_out(todo, lambda plan: task.remote(plan, url), limit=limit, desc="build-shards", unit="img",
                       weight=lambda plan: len(plan.records), progress=progress)
    return {plan.path: sidecar for plan, sidecar in zip(todo, sidecars)}


def _build_info(build: Build, t0: float, t_write: float, t_done: float) -> dict[str, Any]:
    """This run's timings and counts (``build-info.json``)."""
    written_now = sum(build.sides[p.path]["count"] for p in build.todo)
    return {
        "status": "ok",
        "seconds": round(t_done - t0, 3),
        "write_seconds": round(t_done - t_write, 3),
        "shards_written": len(build.todo),
        "shards_kept": len(build.plans) - len(build.todo),
        "images_written": written_now,
        "images_per_s": round(written_now / max(t_done - t_write, 1e-9), 1) if build.todo else None,
        "host": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
