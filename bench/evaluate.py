"""PatchCore speed with faiss versus torch nearest-neighbour search, side by side.

One class at realistic sizes: 200 normal training images and 100 test images with a
16x16 feature grid (a ViT-14 at 224x224), total feature widths 128..1024. Fit = 3x3
aggregation + greedy coreset (10 %, random projection to 128) + index; predict = nearest
neighbours of every test patch + maps at 224x224. Each backend is timed in the same run.

    python bench/evaluate.py [--train 200] [--test 100] [--grid 16] [--dims 128 256 512 1024]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.evaluate.patchcore import PatchCore


def features(n: int, dim: int, grid: int, seed: int) -> list[torch.Tensor]:
    """Two levels of dim/2 channels: a smooth per-position pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    half = dim // 2
    return [
        torch.randn(1, half, grid, grid, generator=torch.Generator().manual_seed(level)) + 0.5 * torch.randn(n, half, grid, grid, generator=g)
        for level in range(2)
    ]


def best_of(f, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    print(
        f"{args.train} train + {args.test} test images, grid {args.grid}x{args.grid}, coreset 10 %, "
        f"maps {args.size}x{args.size}, {torch.get_num_threads()} threads"
    )
    print()
    print(
        "| width | memory bank | fit s torch / faiss | NN torch s | NN faiss s | faiss/torch NN speed | "
        "predict img/s torch | predict img/s faiss | fit+predict img/s torch | fit+predict img/s faiss |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dim in args.dims:
        train = features(args.train, dim, args.grid, 1)
        test = features(args.test, dim, args.grid, 2)
        fit_t, nn, pred, bank = {}, {}, {}, {}
        for name in ("torch", "faiss"):
            t0 = time.perf_counter()
            pc = PatchCore(backend=name).fit(train)
            fit_t[name] = time.perf_counter() - t0
            bank[name] = pc.memory
            nn[name] = best_of(lambda: pc.patch_scores(test), args.repeats)
            pred[name] = best_of(lambda: pc.predict(test, args.size), args.repeats)
        assert torch.equal(bank["torch"], bank["faiss"])  # the same coreset: only the search differs
        print(
            f"| {dim} | {bank['torch'].shape[0]} | {fit_t['torch']:.1f} / {fit_t['faiss']:.1f} | "
            f"{nn['torch']:.3f} | {nn['faiss']:.3f} | {nn['torch'] / nn['faiss']:.2f}x | "
            f"{args.test / pred['torch']:.0f} | {args.test / pred['faiss']:.0f} | "
            f"{(args.train + args.test) / (fit_t['torch'] + pred['torch']):.1f} | "
            f"{(args.train + args.test) / (fit_t['faiss'] + pred['faiss']):.1f} |"
        )

if __name__ == "__main__":
    main()
