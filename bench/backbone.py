"""The frozen backbone's TensorFlow "SAME" padding: timm's padded copies against
``pipeline.backbone.StaticSameConv2d``, side by side in one run.

    python bench/backbone.py                      # the embedded default's backbone, 2 views of 8
    python bench/backbone.py --processes 2        # two such processes at once, as two workers run

Two extractors are built from the embedded default's backbone spec (``--config``): the
project's (batch norms folded, channels-last, static padding) and the same without the static
padding (timm's ``Conv2dSame`` pads a copy of its input before every depthwise stride-2
convolution). Each runs the backbone on two views of ``--batch`` random images, one torch
thread, freed memory kept as in a worker (``pipeline.hostmem``); the two alternate for
``--rounds`` rounds and the medians are printed, with the convolutions that changed timed alone
on the inputs they get in the backbone, and the largest difference between the two extractors'
features. ``--processes N`` starts N copies at once (each prints its own row).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pipeline.backbone as backbone_mod  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.hostmem import retain_freed_memory  # noqa: E402


def ms(fn, reps: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1000


def measure(args) -> str:
    retain_freed_memory()
    torch.set_num_threads(1)
    spec = load_config(args.config).backbone
    static = backbone_mod.build_backbone(spec)
    real = backbone_mod.static_same_padding
    backbone_mod.static_same_padding = lambda model, run: 0
    try:
        padded = backbone_mod.build_backbone(spec)
    finally:
        backbone_mod.static_same_padding = real
    g = torch.Generator().manual_seed(0)
    size = spec.image_size
    views = [torch.rand(args.batch, 3, size, size, generator=g) for _ in range(2)]

    def both(ext) -> None:
        for v in views:
            ext(v)

    times: dict[str, list[float]] = {"padded": [], "static": []}
    for r in range(args.rounds):
        order = [("padded", padded), ("static", static)]
        for name, ext in order if r % 2 == 0 else order[::-1]:
            times[name].append(ms(lambda: both(ext), reps=1))
    diff = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(padded(views[0]), static(views[0])))

    convs = [m for m in static.modules() if isinstance(m, backbone_mod.StaticSameConv2d)]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(convs))}

    def keep(i: int):
        def hook(module, args) -> None:
            inputs[i].append(args[0])
        return hook

    hooks = [c.register_forward_pre_hook(keep(i)) for i, c in enumerate(convs)]
    both(static)
    for h in hooks:
        h.remove()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
        conv_padded = sum(ms(lambda: backbone_mod.conv2d_same(x, c.weight, c.bias, c.stride, (0, 0), c.dilation,
                                                              c.groups)) for i, c in enumerate(convs) for x in inputs[i])
        conv_static = sum(ms(lambda: c(x)) for i, c in enumerate(convs) for x in inputs[i])
    p, s = statistics.median(times["padded"]), statistics.median(times["static"])
    return (f"| {spec.name} | {len(convs)} | {conv_padded:.1f} | {conv_static:.1f} | {conv_padded / conv_static:.2f} "
            f"| {p:.1f} | {s:.1f} | {p / s:.2f} | {diff:.1g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--batch", type=int, default=8, help="images per view")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--processes", type=int, default=1, help="copies run at once")
    ap.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print(measure(args), flush=True)
        return
    cmd = [sys.executable, __file__, "--row", "--config", args.config, "--batch", str(args.batch),
           "--rounds", str(args.rounds)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)]
    rows = [p.communicate()[0].strip() for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a measuring process failed (its error is above)")
    print(f"Backbone on two views of {args.batch} images, one thread per process, {args.processes} process(es) "
          f"at once; ms, medians of {args.rounds} interleaved rounds\n")
    print("| backbone | convolutions changed | those, padded | those, static | ratio | backbone, padded "
          "| backbone, static | ratio | largest feature difference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
