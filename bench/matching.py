"""Residual matching: pipeline.matching.match_residual versus dense formulations.

    python bench/matching.py                        # B=32, 16x16 grid, C = 112 384 768, K = 1 4 8
    python bench/matching.py --channels 768 --k 8 --chunk 1024

Every sample has its own bank of K*h*w reference patches (K references of its class and
view, as in training). Implementations:

- ``chunked``: match_residual (at most ``--chunk`` query patches against the bank at a
  time, bank norms divided out of the similarity block, no normalised copies);
- ``dense``: normalise features and banks, one (B, h*w, K*h*w) similarity tensor, argmax,
  gather;
- ``per-image``: the released code's loop: per image, normalise, (h*w, K*h*w) matrix, argmax.

Every (implementation, C, K) runs in a fresh subprocess. Time is the median of ``--reps``
calls after a warm-up call on small inputs. Peak memory is the rise of the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just before the
first timed call) above its resident set at that moment: what the call allocates, inputs
excluded. The chunked result is compared with the dense one (share of identical matches).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.matching import match_residual


def dense(feat: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    b, c, h, w = feat.shape
    q = F.normalize(feat.flatten(2).transpose(1, 2), dim=-1)
    sims = torch.bmm(q, F.normalize(bank, dim=-1).transpose(1, 2))  # (B, N, P)
    idx = sims.argmax(-1)
    matched = torch.gather(bank, 1, idx.unsqueeze(-1).expand(-1, -1, c))
    return feat - matched.transpose(1, 2).reshape(b, c, h, w)


def per_image(feat: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    b, c, h, w = feat.shape
    out = []
    for i in range(b):
        q = feat[i].flatten(1).T  # (N, C)
        sims = F.normalize(q, dim=1) @ F.normalize(bank[i], dim=1).T
        matched = bank[i][sims.argmax(1)]
        out.append((q - matched).T.reshape(c, h, w))
    return torch.stack(out)


def inputs(b: int, c: int, grid: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, grid, grid, generator=g), torch.randn(b, k * grid * grid, c, generator=g)


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def run_one(impl: str, b: int, c: int, grid: int, k: int, chunk: int, reps: int, out: str) -> dict:
    fn = {"chunked": lambda f, m: match_residual(f, m, chunk), "dense": dense, "per-image": per_image}[impl]
    fn(*inputs(2, c, grid, 1, seed=1))  # warm-up: kernels, thread pools
    feat, bank = inputs(b, c, grid, k, seed=0)
    rss = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM)
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        res = fn(feat, bank)
        times.append(time.perf_counter() - t0)
        if r == 0:
            peak = _status_kib("VmHWM") - rss
            torch.save(res, out)
        del res
    return {"seconds": statistics.median(times), "peak_mib": peak / 1024}


def spawn(impl: str, c: int, k: int, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--channels", str(c), "--k", str(k), "--out", out]
    cmd += ["--batch", str(args.batch), "--grid", str(args.grid), "--chunk", str(args.chunk), "--reps", str(args.reps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} at C={c}, K={k} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="images per batch (B)")
    ap.add_argument("--grid", type=int, default=16, help="feature grid side (h = w)")
    ap.add_argument("--channels", type=int, nargs="+", default=[112, 384, 768], help="feature widths C")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8], help="references per sample K")
    ap.add_argument("--chunk", type=int, default=4096, help="query patches per block in match_residual")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--worker", choices=["chunked", "dense", "per-image"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = run_one(args.worker, args.batch, args.channels[0], args.grid, args.k[0], args.chunk, args.reps, args.out)
        print(json.dumps(res))
        return

    n = args.batch * args.grid**2
    print(
        f"residual matching, B={args.batch}, {args.grid}x{args.grid} grid ({n} query patches), per-sample banks, "
        f"chunk={args.chunk}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    header = (
        "| C | K | bank P | chunked s | dense s | per-image s | dense / chunked time | per-image / chunked time "
        "| chunked peak MiB | dense peak MiB | per-image peak MiB | dense / chunked memory | same matches |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.channels:
            for k in args.k:
                r = {impl: spawn(impl, c, k, args, f"{tmp}/{impl}.pt") for impl in ("chunked", "dense", "per-image")}
                a, d = torch.load(f"{tmp}/chunked.pt"), torch.load(f"{tmp}/dense.pt")
                same = float((a - d).abs().amax(1).le(1e-5).float().mean())
                ch, de, pi = r["chunked"], r["dense"], r["per-image"]
                print(
                    f"| {c} | {k} | {k * args.grid**2} | {ch['seconds']:.3f} | {de['seconds']:.3f} | {pi['seconds']:.3f} "
                    f"| {de['seconds'] / ch['seconds']:.2f}x | {pi['seconds'] / ch['seconds']:.2f}x "
                    f"| {ch['peak_mib']:.0f} | {de['peak_mib']:.0f} | {pi['peak_mib']:.0f} "
                    f"| {de['peak_mib'] / max(ch['peak_mib'], 1e-3):.1f}x | {same:.2%} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
