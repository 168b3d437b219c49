"""One GPU, one table: DINOv2-B and DINOv2-L (random weights) at 224², batch 32.

    bash bench/gpu.sh                   # on the GPU machine: venv if absent, then this, within 8 minutes
    python bench/gpu.py                 # the same, in an installed environment
    python bench/gpu.py --no-compile    # without the torch.compile rows (they cost a minute or two per model)
    python bench/gpu.py --smoke         # any machine, CPU included: vit_tiny_patch16_224, batch 2, every row

Backbone, levels, projector, loss, reference and K settings come from configs/realiad_dinov2_base.yaml
and configs/realiad_dinov2_large.yaml with ``backbone.weights: random`` (no download; the speed of a
network does not depend on its weights). Rows, printed one by one as they finish (a run cut short
still leaves the rows it reached):

- bf16 matmul peak: a square bf16 matmul (8192³; 512³ in smoke mode), timed after warm-up. Every
  utilisation below is against this measured peak, not the data sheet.
- backbone: ``pipeline.backbone.build_backbone`` (bf16 autocast, the configured levels) on a batch
  already on the device; FLOPs of one forward counted by ``torch.utils.flop_counter.FlopCounterMode``;
  MFU = FLOPs/s over the peak. Knobs, each against the plain row: ``channels_last`` (the input and the
  patch embedding), ``torch.compile`` of the extractor. The projector always runs its memory attention
  through ``F.scaled_dot_product_attention`` and has no switch, so only the backbone knobs are compared.
- training step: :func:`train_step_row`, the project's ``pipeline.train.Step`` (two views, references
  gathered from a ``pipeline.bank.WorkerBank`` over a real stored bank, matching, projector, losses)
  with the engine of ``pipeline.train.build_engine`` (DeepSpeed, optimizer step included), K and
  references drawn per step as training draws them; the batch on the host, as the loader yields it. "vs bound" = step time / two views' backbone time (the backbone-only bound);
  host→device bytes are counted over one step at the dispatcher (every tensor copy from host memory
  to the device).
- evaluation features: ``pipeline.export.ADFeatures.features`` (backbone + residual against an
  8-shot bank + projector, no grad) on a batch on the device.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = [("DINOv2-B", "realiad_dinov2_base.yaml"), ("DINOv2-L", "realiad_dinov2_large.yaml")]
SMOKE_MODEL = ("ViT-Ti (smoke)", "realiad_dinov2_base.yaml")
SMOKE_SET = ["backbone.name=vit_tiny_patch16_224", "backbone.levels=[3,6,9,12]", "data.batch_size=2",
             "refbank.per_group=9"]
COLUMNS = ["model", "weights", "row", "images/s", "TFLOP/s", "MFU", "vs bound", "peak GiB", "H→D MiB/step", "note"]
KEYS = ["model", "weights", "row", "images", "tflop", "mfu", "vs", "peak", "h2d", "note"]  # a cell's key per column
TEXT_COLUMNS = {"model", "weights", "row", "note"}


# ----------------------------------------------------------------------------- measuring


def seconds_per_call(fn: Callable[[int], object], device: torch.device, iters: int, warmup: int) -> float:
    """Mean seconds of ``fn(i)`` over ``iters`` calls after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for i in range(warmup):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(warmup, warmup + iters):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t = time.perf_counter()
    for i in range(warmup, warmup + iters):
        fn(i)
    return (time.perf_counter() - t) / iters


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "—"


class HostToDevice(TorchDispatchMode):
    """Adds up the bytes of every tensor copied from host memory to another device by the ops run
    under it (``.to``, ``.cuda``, ``copy_``, blocking or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = {torch.ops.aten._to_copy.default: 0, torch.ops.aten.copy_.default: 1}.get(func)
        if src is not None:
            s, dst = args[src], out
            if isinstance(s, Tensor) and s.device.type == "cpu" and dst.device.type != "cpu":
                self.bytes += s.numel() * s.element_size()
        return out


def matmul_peak(device: torch.device, n: int, iters: int, warmup: int) -> float:
    """Measured bf16 FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / seconds_per_call(lambda _: a @ b, device, iters, warmup)


def forward_flops(backbone, x: Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        backbone(x)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- inputs


def bench_config(file: str, smoke: bool) -> Config:
    return load_config(REPO / "configs" / file, ["backbone.weights=random", *(SMOKE_SET if smoke else [])])


def random_images(n: int, size: int, seed: int) -> Tensor:
    """(n, 3, S, S) images in [0, 1]."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def synthetic_bank(cfg: Config, backbone, device: torch.device, folder: str, groups: int):
    """A real reference bank (``RefBankStore``) of ``groups`` groups of ``refbank.per_group`` images,
    encoded by ``backbone`` from random images (one set of images, written for every group)."""
    from pipeline.refbank import RefBankStore
    from pipeline.transforms import normalize

    m = cfg.refbank.per_group
    x = normalize(random_images(m, backbone.image_size, seed=0), backbone.mean, backbone.std)
    feats = [f.cpu() for f in backbone(x.to(device))]
    store = RefBankStore(folder, cfg.refbank.cache_groups)
    for g in range(groups):
        store.write_group(group_name(g), feats, [f"class{g}-{i}" for i in range(m)])
    store.write_manifest({"bench": True})
    return RefBankStore(folder, cfg.refbank.cache_groups)


def group_name(g: int) -> str:
    return f"bench/class{g}/-"


def host_batch(cfg: Config, backbone, groups: int) -> dict:
    """A batch as ``pipeline.data.train_loader`` yields it (host tensors): two normalised views,
    masks with one square defect on the abnormal share, each sample's group and its own key in the
    bank (so it is excluded from its references, as in training)."""
    from pipeline.transforms import normalize

    b, s = cfg.data.batch_size, backbone.image_size
    views = [normalize(random_images(b, s, seed=100 + v), backbone.mean, backbone.std) for v in (1, 2)]
    mask = torch.zeros(b, s, s, dtype=torch.bool)
    rng = np.random.default_rng(0)
    for i in range(max(1, round(b * cfg.data.abnormal_fraction))):
        y, x = rng.integers(0, s - s // 4, 2)
        mask[i, y : y + s // 4, x : x + s // 4] = True
    return {
        "view1": views[0], "view2": views[1], "mask": mask, "label": mask.flatten(1).any(1).long(),
        "group": [group_name(i % groups) for i in range(b)],
        "key": [f"class{i % groups}-{i // groups % cfg.refbank.per_group}" for i in range(b)],
    }


def ensure_process_group(device: torch.device) -> None:
    """A one-rank process group on 127.0.0.1 for the DeepSpeed engine (NCCL on a GPU, else gloo)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


# ----------------------------------------------------------------------------- rows


def train_step_row(cfg: Config, backbone, device: torch.device, folder: str, groups: int, iters: int,
                   warmup: int) -> dict:
    """The whole training step through pipeline/train.py's pieces, as ``train_loop`` runs one
    micro-batch: ``WorkerBank`` over a real stored bank, ``Step`` (both views through the backbone,
    references gathered, matching, projector, losses), the engine of ``build_engine``, K from
    ``choose_k`` and references from ``draw_generator``; ``engine.backward`` and ``engine.step``.
    Centers are the mean normal residual of one batch, as the centers stage computes them.
    Returns seconds per step, peak memory, the host→device bytes of one step and the bank's size."""
    from pipeline.bank import WorkerBank
    from pipeline.projector import Projector
    from pipeline.centers import CenterAccumulator
    from pipeline.train import Step, build_engine, choose_k, draw_generator
    from pipeline.transforms import patch_labels

    ensure_process_group(device)
    bank = WorkerBank(synthetic_bank(cfg, backbone, device, folder, groups), device, cfg.train.bank_memory_fraction)
    batch = host_batch(cfg, backbone, groups)
    probe = 10**9  # a draw index no timed step uses
    with torch.no_grad():
        r1, _ = Step(cfg, backbone, bank, []).residuals(batch, cfg.centers.k, draw_generator(cfg, probe, 0))
    acc = CenterAccumulator(backbone.widths)
    acc.add(r1, [~patch_labels(batch["mask"], backbone.grid, "nearest")] * len(r1))
    step_math = Step(cfg, backbone, bank, [c.to(device) for c in acc.centers()])

    torch.manual_seed(cfg.seed)
    engine, _ = build_engine(cfg, Projector.from_spec(backbone.widths, cfg.projector).to(device), 1)

    def one_step(draw: int) -> None:
        total, _ = step_math(engine, batch, choose_k(cfg, draw), draw_generator(cfg, draw, 0))
        engine.backward(total)
        engine.step()

    one_step(0)  # allocations and kernels warm before counting
    counter = HostToDevice()
    with counter:
        one_step(1)
    reset_peak(device)
    sec = seconds_per_call(one_step, device, iters, warmup)
    return {"seconds": sec, "peak": peak_gib(device), "h2d": counter.bytes,
            "ks": sorted({choose_k(cfg, d) for d in range(warmup + iters)}),
            "image_bytes": batch["view1"].nbytes + batch["view2"].nbytes,
            "bank": f"{groups} groups x {cfg.refbank.per_group} images, {bank.nbytes / 2**30:.2f} GiB "
                    f"{'on the device' if bank.on_device else 'in pinned host memory'}"}


def eval_row(cfg: Config, backbone, device: torch.device, iters: int, warmup: int) -> float:
    """Seconds per batch of ``ADFeatures.features`` against a ``eval.k_shot`` reference bank."""
    from pipeline.export import ADFeatures
    from pipeline.projector import Projector

    projector = Projector.from_spec(backbone.widths, cfg.projector).eval().to(device)
    centers = [torch.zeros(w, device=device) for w in backbone.widths]  # not used on this path
    features = ADFeatures(backbone, projector, centers, spec={}, device=device, match_chunk=cfg.refbank.match_chunk)
    bank = features.bank(random_images(cfg.eval.k_shot, backbone.image_size, seed=7).to(device))
    images = random_images(cfg.data.batch_size, backbone.image_size, seed=8).to(device)
    return seconds_per_call(lambda _: features.features(images, bank), device, iters, warmup)


# ----------------------------------------------------------------------------- table


class Table:
    """The markdown table, printed to ``out`` row by row as the rows are measured."""

    def __init__(self, out) -> None:
        self.out = out
        print("| " + " | ".join(COLUMNS) + " |", file=out)
        print("|" + "|".join(" --- " if k in TEXT_COLUMNS else " ---: " for k in KEYS) + "|", file=out, flush=True)

    def add(self, **cells: str) -> None:
        print("| " + " | ".join(cells.get(k, "—") for k in KEYS) + " |", file=self.out, flush=True)


def guarded(table: Table, model: str, row: str, fn: Callable[[], dict | None]) -> dict | None:
    """Run one row (``fn`` returns its cells, or None when it adds its own rows); a failure becomes a
    'failed' row (traceback on stderr) and the other rows still run."""
    try:
        cells = fn()
    except Exception as e:  # one row's failure must not cost the rest of a one-shot GPU run
        traceback.print_exc()
        table.add(model=model, weights="random", row=row, note=f"failed: {type(e).__name__}: {str(e)[:160]}")
        return None
    if cells is not None:
        table.add(model=model, weights="random", row=row, **{k: v for k, v in cells.items() if not k.startswith("_")})
    return cells


def bench_model(table: Table, label: str, cfg: Config, device: torch.device, peak: float, args, folder: str) -> None:
    from pipeline.backbone import build_backbone

    backbone = build_backbone(cfg.backbone).to(device)
    b = cfg.data.batch_size
    x = random_images(b, backbone.image_size, seed=1).to(device)
    flops = forward_flops(backbone, x) / b  # per image

    def backbone_cells(model, inputs: Tensor, note: str) -> dict:
        reset_peak(device)
        sec = seconds_per_call(lambda _: model(inputs), device, args.iters, args.warmup)
        rate = flops * b / sec
        return {"images": f"{b / sec:.1f}", "tflop": f"{rate / 1e12:.3g}", "mfu": f"{rate / peak:.1%}",
                "peak": peak_gib(device), "note": note, "_seconds": sec}

    plain = guarded(table, label, "backbone bf16", lambda: backbone_cells(
        backbone, x, f"{flops / 1e9:.1f} GFLOP/image, levels {list(backbone.levels)}, batch {b}"))
    guarded(table, label, "evaluation features", lambda: {
        "images": f"{b / eval_row(cfg, backbone, device, args.iters, args.warmup):.1f}",
        "note": f"ADFeatures.features, {cfg.eval.k_shot}-shot bank, no grad"})

    def step_cells() -> dict:
        r = train_step_row(cfg, backbone, device, os.path.join(folder, label.split(" ")[0]), args.bank_groups,
                           args.iters, args.warmup)
        bound = 2 * plain["_seconds"] if plain else math.nan
        return {"images": f"{b / r['seconds']:.1f}", "vs": f"{r['seconds'] / bound:.2f}×", "peak": r["peak"],
                "h2d": f"{r['h2d'] / 2**20:.1f}",
                "note": f"K in {r['ks']}; bank {r['bank']}; of the H→D bytes, images {r['image_bytes'] / 2**20:.1f} MiB"}

    guarded(table, label, "training step", step_cells)

    def knob(model, inputs: Tensor, note: str) -> dict:
        cells = backbone_cells(model, inputs, note)
        if plain:
            cells["note"] += f"; {plain['_seconds'] / cells['_seconds']:.2f}× the plain backbone"
        return cells

    def channels_last() -> dict:
        backbone.to(memory_format=torch.channels_last)
        try:
            return knob(backbone, x.contiguous(memory_format=torch.channels_last), "channels_last input and weights")
        finally:
            backbone.to(memory_format=torch.contiguous_format)

    guarded(table, label, "backbone + channels_last", channels_last)
    if not args.no_compile:
        guarded(table, label, f"backbone + torch.compile ({args.compile_backend})",
                lambda: knob(torch.compile(backbone, backend=args.compile_backend), x, "compiled extractor"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny ViT, batch 2, 1 iteration, 512³ matmul: every row quickly")
    ap.add_argument("--iters", type=int, help="timed calls per row (default 20; smoke 1)")
    ap.add_argument("--warmup", type=int, help="untimed calls before each row (default 5; smoke 1)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    ap.add_argument("--compile-backend", help="torch.compile backend (default inductor; smoke eager)")
    ap.add_argument("--bank-groups", type=int, help="groups of the training step's reference bank, each of "
                    "refbank.per_group images (default 32; smoke 2)")
    args = ap.parse_args()
    args.iters = args.iters or (1 if args.smoke else 20)
    args.bank_groups = args.bank_groups or (2 if args.smoke else 32)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if args.iters < 1 or args.warmup < 0 or args.bank_groups < 1:
        ap.error("--iters and --bank-groups must be at least 1, --warmup at least 0")

    from pipeline.devices import resolve

    device = resolve("auto")
    t0 = time.perf_counter()
    out = sys.stdout
    print(f"device: {device_name(device)}; torch {torch.__version__}\n", file=out, flush=True)
    with contextlib.redirect_stdout(sys.stderr):  # what the libraries print goes to stderr: stdout holds the table
        cfg = measure(Table(out), device, args)
    print(f"\nimage {cfg.backbone.image_size}², batch {cfg.data.batch_size}, bf16 autocast, weights random (not "
          f"downloaded); {args.warmup} warm-up + {args.iters} timed calls per row; total {time.perf_counter() - t0:.0f} s",
          file=out)
    return 0


def measure(table: Table, device: torch.device, args) -> Config:
    """Every row of the table; returns the last model's config."""
    n = 512 if args.smoke else 8192
    peak = guarded(table, "—", f"bf16 matmul peak ({n}³)", lambda: (lambda f: {
        "tflop": f"{f / 1e12:.3g}", "note": "measured; MFU below is against it", "_flops": f})(
        matmul_peak(device, n, args.iters, args.warmup)))
    peak_flops = peak["_flops"] if peak else math.nan
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        for label, file in [SMOKE_MODEL] if args.smoke else MODELS:
            cfg = bench_config(file, args.smoke)
            guarded(table, label, "set-up", lambda: bench_model(table, label, cfg, device, peak_flops, args, folder))
    if dist.is_initialized():
        dist.destroy_process_group()
    return cfg


if __name__ == "__main__":
    sys.exit(main())
