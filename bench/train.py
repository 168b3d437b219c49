"""Training throughput: this project's loop against the released code's loop, side by side.

    python bench/train.py                                        # 12 steps; a few minutes
    python bench/train.py --rounds 4 --steps 4 --workdir /tmp/bench-train      # steadier; data kept
    python bench/train.py --set data.batch_size=16 --set data.loader_workers=2
    python bench/train.py --threads 2                            # torch on every core, the loader beside it

Both loops run in this one process with the same frozen backbone, batch size, image size,
projector, losses, optimizer step (torch Adam with the config's lr and weight decay, gradient
clipping, bf16 autocast of the projector when ``train.deepspeed.precision`` is bf16) and K
schedule (``pipeline.train.choose_k``). Settings come from ``--config`` (default
configs/local.yaml) with ``--set key=value`` overrides; the data is the bench's own.

- ours: ``pipeline.data.train_loader`` (WebDataset shards, ``data.loader_workers`` loader
  processes) -> ``Step.residuals`` (references drawn from the stored bank: no backbone pass for
  them) -> ``Step.loss`` -> backward -> step.
- released: what the released training code does. A map-style Dataset over the image files in
  the source folders (read, decode, resize per item, two photometric views) in a DataLoader with
  the same number of workers and the same batch composition (abnormal share as configured), and
  for every sample, in the training process, K normal images of its class and view (never the
  sample itself, as in the bank) read from disk, decoded, resized and encoded by the backbone,
  one backbone call per sample as released; then the same ``Step`` matching, projector, losses,
  backward and step, with the released implementations where this project changed them: the
  backbone in NCHW order (ours: channels-last), torchvision's Gaussian blur in the views (ours:
  OpenCV's, the same result) and the memory attention as one ``scaled_dot_product_attention`` call
  per level (ours on CPU: in cache-sized blocks of queries). A batch without any abnormal patch is skipped, as released (its loading
  time counts as data wait). Per item the baseline decodes and resizes once, as ours does (the
  released code resizes once per view), so its data path is, if anything, a little faster than
  the released one.

Threads: torch runs the loops with ``train.cpus_per_worker`` threads (one by default), as Ray
Train runs one worker, and the loader processes run beside it (``--threads`` changes it).
Host memory: freed memory stays in the process (:func:`pipeline.hostmem.retain_freed_memory`,
as in a training worker) for both loops; the released code leaves glibc's default, under which
its loop would be slower, so the comparison favours it.

Timing: ``--rounds`` rounds; in each, the two loops run back to back (which goes first
alternates, so a drifting machine load favours neither), each on a fresh loader with
``--warmup`` untimed steps and then ``--steps`` timed steps; step i of a round has the same K
in both loops. Speeds and speed-ups are over all timed steps; the speed-up of every round is
printed too, to show how much the machine's load moved the figures.

Data is prepared once with the project's stages: synthetic Real-IAD-layout images -> shards ->
reference bank -> centers (the shard and centers stages start a local Ray for that and it is
shut down before timing; the timed loops use no Ray). It goes to a temporary folder, removed at
the end, or to ``--workdir``, where it is kept and reused (every stage skips what exists).

Printed: a markdown table with, per loop, samples/s, the speed-up over the released loop, the
share of step time spent waiting for the loader, ms per step spent on references (released:
read + decode + encode; ours: drawing from the bank), on the backbone over both views plus
matching, and on projector + losses + backward + step, the step's time over the backbone bound (the
frozen backbone alone on the same two views, timed in the same process after every step), and the
same speeds and speed-up for the inputs alone (everything before the projector); then the speed-up of every round, the machine
and the settings.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.train_loops import (  # noqa: E402
    FileReferences,
    Loop,
    Totals,
    group_of_record,
    ours_batches,
    released_attention,
    released_backbone,
    released_batches,
)
from pipeline.config import Config, ConfigError, load_config  # noqa: E402
from shards.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SOURCE = "realiad-bench"


# ----------------------------------------------------------------------------- data


def bench_config(path: str, work: Path, args: argparse.Namespace) -> Config:
    """The config at ``path`` with the bench's own source, shard folder and storage, then overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path!r} does not exist (see configs/ for examples)")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping at the top level")
    data["name"] = "bench-train"
    data["sources"] = [{
        "name": SOURCE, "layout": "realiad", "root": str(work / "realiad"), "split": "pretrain",
        "synth": {"classes": args.classes, "normal": args.normal, "abnormal": args.abnormal, "size": args.size,
                  "views": args.views, "seed": 1},
    }]
    data["shards"] = {**data.get("shards", {}), "url": str(work / "shards")}
    data["train"] = {**data.get("train", {}), "storage": str(work / "ray")}
    return load_config(data, args.set)


def prepare(cfg: Config):
    """Shards (synthesising the source first), reference bank and centers; returns the backbone."""
    import ray

    from pipeline.stages import Context, centers
    from pipeline.stages import shards as shards_stage

    ctx = Context()
    shards_stage.run(cfg, ctx)
    centers.run(cfg, ctx)  # builds the reference bank first
    if ray.is_initialized():
        ray.shutdown()
    return ctx.backbone(cfg.backbone)


# ----------------------------------------------------------------------------- report


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"


def table(ours: Loop, released: Loop) -> str:
    """Markdown table over all timed steps, and the speed-up of each round (the spread shows how
    much the machine's load moved the figures)."""
    o, r = Totals.sum(ours.rounds), Totals.sum(released.rounds)
    head = ["loop", "timed steps", "samples/s", "vs released", "data wait", "references ms/step",
            "backbone+matching ms/step", "projector+losses+step ms/step", "step / backbone bound", "inputs samples/s",
            "inputs vs released"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for lp, t in ((released, r), (ours, o)):
        skipped = f" ({t.skipped} batches skipped)" if t.skipped else ""
        cells = [lp.name, f"{t.steps}{skipped}", f"{t.speed:.2f}", f"{t.speed / r.speed:.2f}x",
                 f"{t.data / t.seconds:.1%}", f"{1000 * t.refs / t.steps:.0f}", f"{1000 * t.features / t.steps:.0f}",
                 f"{1000 * t.update / t.steps:.0f}", f"{t.seconds / t.bound:.2f}x", f"{t.inputs_speed:.2f}",
                 f"{t.inputs_speed / r.inputs_speed:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    per_round = ", ".join(f"{x.speed / y.speed:.2f}x" for x, y in zip(ours.rounds, released.rounds))
    return "\n".join(lines + ["", f"speed-up per round: {per_round}"])


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "local.yaml"),
                    help="settings of backbone, data, projector, loss, train (its sources are replaced)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per loop and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per loop and round (loader start-up)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; the loops alternate which runs first")
    ap.add_argument("--workdir", help="prepare the data here and keep it (reused when present)")
    ap.add_argument("--classes", type=int, default=2, help="synthetic Real-IAD classes")
    ap.add_argument("--normal", type=int, default=10, help="normal samples per class (each in --views views)")
    ap.add_argument("--abnormal", type=int, default=4, help="abnormal samples per class")
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic source images")
    ap.add_argument("--threads", type=int, help="torch threads of the loops (default: train.cpus_per_worker, "
                    "what Ray Train gives one worker)")
    args = ap.parse_args()
    for flag in ("steps", "rounds"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be at least 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        return run(args, work)
    except (ConfigError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    from pipeline.centers import load_centers
    from pipeline.refbank import RefBankStore
    from pipeline.bank import WorkerBank
    from pipeline.hostmem import retain_freed_memory
    from pipeline.paths import centers_url, refbank_url
    from shards.sources import scan_source

    cfg = bench_config(args.config, work, args)
    load_start = os.getloadavg()[0]
    t = time.perf_counter()
    backbone = prepare(cfg)
    torch.set_num_threads(args.threads or max(1, int(cfg.train.cpus_per_worker)))
    retain_freed_memory()  # as a training worker does, here for both loops
    print(f"data prepared in {work} in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    centers, _ = load_centers(centers_url(cfg, backbone.id), backbone.id)
    store = RefBankStore(refbank_url(cfg, backbone.id), cfg.refbank.cache_groups)
    records = [r for s in cfg.sources_with("pretrain") for r in scan_source(s).records]
    normals: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in records:
        if not r.label:
            normals[group_of_record(r)].append((r.key, r.url))
    records = [r for r in records if not r.label or r.mask_url]  # abnormal images need masks, as in the shards

    ours = Loop("ours (shards + stored bank)", cfg, backbone, WorkerBank(store, torch.device("cpu")), centers,
                ours_batches(cfg, backbone))
    nchw = released_backbone(cfg.backbone)
    released = Loop("released (files + refs encoded per step)", cfg, nchw, FileReferences(normals, nchw,
                    cfg.backbone.image_size), centers, released_batches(cfg, nchw, records))
    released_attention(released.projector)
    per_round = args.warmup + args.steps
    for rnd in range(args.rounds):
        order = (ours, released) if rnd % 2 == 0 else (released, ours)
        for lp in order:
            t = lp.run(rnd, rnd * per_round, args.warmup, args.steps)
            print(f"round {rnd + 1}/{args.rounds} {lp.name}: {t.speed:.2f} samples/s", file=sys.stderr)

    lc = cfg.data
    n_abnormal = max(1, round(lc.batch_size * lc.abnormal_fraction))
    print(table(ours, released))
    print()
    print(f"machine: {machine()}; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"backbone: {backbone.id} ({backbone.weights_desc}), levels {list(cfg.backbone.levels)}, widths "
          f"{backbone.widths}, grid {backbone.grid}; projector memory {cfg.projector.memory_size}; "
          f"precision {cfg.train.deepspeed.precision}")
    print(f"batch {lc.batch_size} ({n_abnormal} abnormal), image {cfg.backbone.image_size}, K from {lc.k_choices}, "
          f"loader workers {lc.loader_workers}; {args.rounds} rounds x {args.steps} timed steps after "
          f"{args.warmup} warm-up steps per loop; data: {args.classes} synthetic Real-IAD classes x "
          f"({args.normal} normal + {args.abnormal} abnormal) x {args.views} views at {args.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
