"""Chunked versus dense angle loss: time and peak memory of one forward + backward pass.

    python bench/losses.py                      # N = 4096, 16384, 65536 patches per view, C = 256
    python bench/losses.py --patches 4096 --channels 768 --chunk 2048

N is the number of patches per view (B * h * w), so the loss has 2N rows; a fraction
``--abnormal`` of them is abnormal. "dense" is the formulation of the released code, in log
space: the N_normal x N_abnormal and N_abnormal x N_normal similarity matrices are built
whole and reduced with logsumexp. "chunked" is pipeline.losses.angle_loss.

Every (implementation, size) runs in a fresh subprocess. Peak memory is the rise of the
process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs right
before the pass) above its resident set at that moment: everything the pass allocates,
the input features excluded, the gradients of the inputs included. Time is the wall time
of that one pass (after a small warm-up run). A dense pass that would not fit in the
memory available now is not run; its peak is then extrapolated from the largest dense run
(bytes per similarity-matrix entry) and marked "~". Values are compared with the dense
value where the dense pass ran, and with the chunked loss computed in float64 everywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.losses import angle_loss

TAU = 0.15


def dense_angle_loss(e1: torch.Tensor, e2: torch.Tensor, y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The released formulation, in log space: both similarity matrices materialised."""
    n = e1.shape[0]
    z = F.normalize(torch.cat([e1, e2]) - mu, dim=1)
    y2 = torch.cat([y, y])
    zn, za = z[~y2], z[y2]
    lse_n = torch.logsumexp(zn @ za.T / TAU, dim=1)  # (N_normal, N_abnormal)
    lse_a = torch.logsumexp(za @ zn.T / TAU, dim=1)  # (N_abnormal, N_normal)
    pos = (z[:n] * z[n:]).sum()
    return (lse_n.sum() + lse_a.sum() - 2 * pos / TAU) / (2 * n)


def make_inputs(n: int, c: int, abnormal: float, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < abnormal
    e1 = torch.randn(n, c, generator=g)
    e1[y] += 0.5 * torch.randn(c, generator=g)  # abnormal patches lean one way
    e2 = e1 + 0.3 * torch.randn(n, c, generator=g)
    mu = 0.1 * torch.randn(c, generator=g)
    return e1.to(dtype), e2.to(dtype), y, mu.to(dtype)


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def run_one(impl: str, n: int, c: int, abnormal: float, chunk: int, grad_out: str) -> dict:
    """One forward + backward pass in this process; returns time, peak memory and the loss."""
    fn = {
        "chunked": lambda a, b, y, m: angle_loss(a, b, y, m, TAU, chunk_size=chunk),
        "dense": dense_angle_loss,
        "chunked64": lambda a, b, y, m: angle_loss(a, b, y, m, TAU, chunk_size=chunk),
    }[impl]
    dtype = torch.float64 if impl == "chunked64" else torch.float32
    w1, w2, wy, wm = make_inputs(256, c, 0.25, dtype, seed=1)
    fn(w1.requires_grad_(True), w2, wy, wm).backward()  # warm-up: kernels, thread pools
    e1, e2, y, mu = make_inputs(n, c, abnormal, dtype)
    e1.requires_grad_(True)
    e2.requires_grad_(True)
    rss = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM)
    t0 = time.perf_counter()
    if impl == "chunked64":
        with torch.no_grad():
            loss = fn(e1, e2, y, mu)
    else:
        loss = fn(e1, e2, y, mu)
        loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") - rss
    if impl != "chunked64" and grad_out:
        torch.save(e1.grad, grad_out)
    return {"seconds": seconds, "peak_mib": peak / 1024, "loss": float(loss.detach()), "abnormal": int(y.sum())}


def spawn(impl: str, n: int, args: argparse.Namespace, grad_out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--patches", str(n), "--channels", str(args.channels)]
    cmd += ["--abnormal", str(args.abnormal), "--chunk", str(args.chunk), "--grad-out", grad_out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} at N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_mib() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patches", type=int, nargs="+", default=[4096, 16384, 65536], help="patches per view (N)")
    ap.add_argument("--channels", type=int, default=256, help="feature width C")
    ap.add_argument("--abnormal", type=float, default=0.1, help="fraction of abnormal patches")
    ap.add_argument("--chunk", type=int, default=4096, help="chunk_size of the chunked loss")
    ap.add_argument("--worker", choices=["chunked", "dense", "chunked64"], help=argparse.SUPPRESS)
    ap.add_argument("--grad-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        out = run_one(args.worker, args.patches[0], args.channels, args.abnormal, args.chunk, args.grad_out)
        print(json.dumps(out))
        return

    print(
        f"angle loss, forward + backward, C={args.channels}, {args.abnormal:.0%} abnormal, "
        f"chunk_size={args.chunk}, float32, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    header = (
        "| N (patches/view) | 2N rows | abnormal rows | chunked s | dense s | chunked peak MiB | dense peak MiB "
        "| memory ratio | rel. diff vs dense | rel. diff vs float64 | grad rel. diff |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    bytes_per_entry = None  # dense peak per similarity-matrix entry, from the largest dense run
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.patches:
            g_chunked, g_dense = f"{tmp}/chunked.pt", f"{tmp}/dense.pt"
            ch = spawn("chunked", n, args, g_chunked)
            exact = spawn("chunked64", n, args, "")
            rows_ab = 2 * ch["abnormal"]
            entries = 2 * (2 * n - rows_ab) * rows_ab  # both dense matrices
            need_mib = entries * (bytes_per_entry or 12.0) / 2**20  # first guess: three float32 copies
            dense = None
            if need_mib < 0.6 * available_mib():
                dense = spawn("dense", n, args, g_dense)
                bytes_per_entry = dense["peak_mib"] * 2**20 / entries
            rel_exact = abs(ch["loss"] - exact["loss"]) / abs(exact["loss"])
            if dense is not None:
                gc, gd = torch.load(g_chunked), torch.load(g_dense)
                grad_diff = f"{float((gc - gd).abs().max() / gd.abs().max()):.1e}"
                rel_dense = f"{abs(ch['loss'] - dense['loss']) / abs(dense['loss']):.1e}"
                dense_s, dense_mib = f"{dense['seconds']:.2f}", f"{dense['peak_mib']:.0f}"
                ratio = f"{dense['peak_mib'] / ch['peak_mib']:.1f}x"
            else:
                est = need_mib
                grad_diff = rel_dense = dense_s = "not run"
                dense_mib = f"~{est:.0f} (not run: {available_mib():.0f} MiB free)"
                ratio = f"~{est / ch['peak_mib']:.0f}x"
            print(
                f"| {n} | {2 * n} | {rows_ab} | {ch['seconds']:.2f} | {dense_s} | {ch['peak_mib']:.0f} | {dense_mib} "
                f"| {ratio} | {rel_dense} | {rel_exact:.1e} | {grad_diff} |",
                flush=True,
            )
    if bytes_per_entry:
        print(
            f"dense: {bytes_per_entry:.1f} bytes per similarity-matrix entry at its largest run; "
            "'~' values are that times the entries of both matrices"
        )


if __name__ == "__main__":
    main()
