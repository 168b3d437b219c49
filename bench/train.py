"""Training throughput: this project's loop against the released code's loop, side by side.

    python bench/train.py                                        # 12 steps; a few minutes
    python bench/train.py --rounds 4 --steps 4 --workdir /tmp/bench-train      # steadier; data kept
    python bench/train.py --set data.batch_size=16 --set data.loader_workers=2

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
  backward and step. A batch without any abnormal patch is skipped, as released (its loading
  time counts as data wait). Per item the baseline decodes and resizes once, as ours does (the
  released code resizes once per view), so its data path is, if anything, a little faster than
  the released one.

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
matching, and on projector + losses + backward + step, and the same speeds and speed-up for the
inputs alone (everything before the projector); then the speed-up of every round, the machine
and the settings.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402

from pipeline.config import Config, ConfigError, load_config  # noqa: E402
from shards.errors import UserError  # noqa: E402
from pipeline.transforms import (  # noqa: E402
    PhotometricViews,
    decode_image,
    decode_mask,
    image_to_tensor,
    mask_to_tensor,
    normalize,
    patch_labels,
)
from shards import storage  # noqa: E402
from shards.record import SampleRecord  # noqa: E402

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


def group_of_record(r: SampleRecord) -> str:
    """The reference group of a record, spelled as ``pipeline.data.group_of`` spells a sample's."""
    return f"{r.source}/{r.cls}/{r.view or '-'}"


class FileImages(Dataset):
    """The released data path: one item = one image file (and its mask file) read, decoded,
    resized and centre-cropped, then two photometric views, normalised."""

    def __init__(self, records: list[SampleRecord], size: int, mean, std, augment: bool):
        self.records, self.size, self.mean, self.std = records, size, tuple(mean), tuple(std)
        self.views = PhotometricViews(size, augment)

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
            for name in ("steps", "samples", "skipped", "data", "refs", "features", "update"):
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
        finally:
            del it  # the last reference: its loader processes shut down
            gc.collect()
        self.rounds.append(out)
        return out


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
            "backbone+matching ms/step", "projector+losses+step ms/step", "inputs samples/s", "inputs vs released"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for lp, t in ((released, r), (ours, o)):
        skipped = f" ({t.skipped} batches skipped)" if t.skipped else ""
        cells = [lp.name, f"{t.steps}{skipped}", f"{t.speed:.2f}", f"{t.speed / r.speed:.2f}x",
                 f"{t.data / t.seconds:.1%}", f"{1000 * t.refs / t.steps:.0f}", f"{1000 * t.features / t.steps:.0f}",
                 f"{1000 * t.update / t.steps:.0f}", f"{t.inputs_speed:.2f}", f"{t.inputs_speed / r.inputs_speed:.2f}x"]
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
    from pipeline.paths import centers_url, refbank_url
    from shards.sources import scan_source

    cfg = bench_config(args.config, work, args)
    load_start = os.getloadavg()[0]
    t = time.perf_counter()
    backbone = prepare(cfg)
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
    released = Loop("released (files + refs encoded per step)", cfg, backbone, FileReferences(normals, backbone,
                    cfg.backbone.image_size), centers, released_batches(cfg, backbone, records))
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
