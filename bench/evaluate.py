"""PatchCore speed with torch versus faiss nearest-neighbour search.

One class at realistic sizes: 200 normal training images and 100 test images with a
16x16 feature grid (a ViT-14 at 224x224), total feature widths 128..1024. Fit = 3x3
aggregation + greedy coreset (10 %, random projection to 128) + index; predict = nearest
neighbour of every test patch + maps at 224x224.

Each backend runs in its own process (faiss-cpu brings its own OpenMP runtime and BLAS),
with --threads threads for torch and faiss alike, and times are CPU seconds of that
process. The default is 1 thread: on a shared, busy machine two-thread timings vary by
orders of magnitude from run to run (a parallel region waits for its descheduled
thread), while one-thread CPU times compare the algorithms.

    python bench/evaluate.py [--train 200] [--test 100] [--grid 16] [--dims 128 256 512 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from pipeline.evaluate.patchcore import PatchCore


def features(n: int, dim: int, grid: int, seed: int) -> list[torch.Tensor]:
    """Two levels of dim/2 channels: a per-position pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    half = dim // 2
    return [
        torch.randn(1, half, grid, grid, generator=torch.Generator().manual_seed(level))
        + 0.5 * torch.randn(n, half, grid, grid, generator=g)
        for level in range(2)
    ]


def best_of(f, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        f()
        best = min(best, time.process_time() - t)
    return best


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.worker == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
    train = features(args.train, args.dim, args.grid, 1)
    test = features(args.test, args.dim, args.grid, 2)
    t = time.process_time()
    pc = PatchCore(backend=args.worker).fit(train)
    fit = time.process_time() - t
    nn = best_of(lambda: pc.patch_scores(test), args.repeats)
    pred = best_of(lambda: pc.predict(test, args.size), args.repeats)
    return {"fit": fit, "nn": nn, "pred": pred, "bank": pc.memory.shape[0]}


def run_worker(kind: str, dim: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--dim", str(dim)]
    for key in ("train", "test", "grid", "size", "repeats", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", choices=["torch", "faiss"], help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    total = args.train + args.test
    print(
        f"{args.train} train + {args.test} test images, grid {args.grid}x{args.grid}, coreset 10 %, "
        f"maps {args.size}x{args.size}, {args.threads} thread(s), CPU seconds, best of {args.repeats}"
    )
    print()
    print(
        "| width | memory bank | fit s torch / faiss | NN s torch | NN s faiss | faiss speed-up (NN) | "
        "predict img/s torch / faiss | fit+predict img/s torch / faiss |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dim in args.dims:
        r = {kind: run_worker(kind, dim, args) for kind in ("torch", "faiss")}
        t, f = r["torch"], r["faiss"]
        print(
            f"| {dim} | {t['bank']} | {t['fit']:.1f} / {f['fit']:.1f} | {t['nn']:.3f} | {f['nn']:.3f} | "
            f"{t['nn'] / f['nn']:.2f}x | {args.test / t['pred']:.0f} / {args.test / f['pred']:.0f} | "
            f"{total / (t['fit'] + t['pred']):.1f} / {total / (f['fit'] + f['pred']):.1f} |"
        )

if __name__ == "__main__":
    main()
