"""Every evaluation method's fit and predict speed at a config's feature size.

    python -m bench.methods [--config configs/local.yaml] [--fit 20] [--test 32] [--threads 1] [--device cuda]

The feature widths and grid come from the config's backbone (the embedded default:
EfficientNet-Lite0 levels 1, 2 and 3, widths 24 + 40 + 112 on a 16x16 grid), the budgets of the
learned methods from its ``eval`` section. Features are random (speed only, not quality):
``--fit`` normal images to fit on, ``--test`` images to score, maps at the config's image
size. On the CPU, times are CPU seconds of this process with ``--threads`` torch threads (the
evaluation jobs run one thread per task); with ``--device cuda`` (bench/gpu.sh), wall seconds
with the device synchronised, features on the GPU. For the learned methods, the fit with the paper's default
budget is one epoch timed and multiplied by the epochs (a GPU-sized budget; the column says
what a CPU would take).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.evalspec import METHODS, EvalSpec  # noqa: E402
from pipeline.evaluate.methods import make_method  # noqa: E402

LEARNED = ("cflow", "uniad", "glass")


def features(n: int, widths: list[int], grid: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, w, grid, grid, generator=g).to(device) for w in widths]


def timed(fn, device: torch.device = torch.device("cpu")) -> tuple[float, object]:
    """Seconds of ``fn``: CPU seconds on the CPU, synchronised wall seconds on a GPU."""
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    t = clock()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return clock() - t, out


def paper_fit(name: str, fit: list[torch.Tensor], seed: int) -> float:
    """Seconds of one epoch at the paper's budget, times its epochs."""
    paper = getattr(EvalSpec(), name)
    one = EvalSpec(**{name: {**paper.model_dump(), "epochs": 1}}, seed=seed)
    seconds, _ = timed(lambda: make_method(name, one).fit(fit), fit[0].device)
    return seconds * paper.epochs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "local.yaml"))
    ap.add_argument("--fit", type=int, default=20, help="normal images to fit on")
    ap.add_argument("--test", type=int, default=32, help="images to score")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-paper", action="store_true", help="skip the one-epoch runs at the paper's budgets")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this machine has no CUDA device")
    from pipeline.backbone import build_backbone

    cfg = load_config(args.config)
    backbone = build_backbone(cfg.backbone)
    widths, grid, size = backbone.widths, backbone.grid, cfg.backbone.image_size
    fit, test = features(args.fit, widths, grid, 1, device), features(args.test, widths, grid, 2, device)
    clock = "wall seconds" if device.type == "cuda" else f"{args.threads} thread(s), CPU seconds"
    print(f"{args.fit} fit + {args.test} test images, widths {widths}, grid {grid}x{grid}, maps {size}x{size}, "
          f"on {device}, {clock}; budgets of {args.config}")
    print()
    print("| method | fit s (config budget) | predict img/s | fit s at the paper's budget (extrapolated) |")
    print("| --- | ---: | ---: | ---: |")
    for name in METHODS:
        fit_s, method = timed(lambda: make_method(name, cfg.eval).fit(fit), device)
        pred_s, _ = timed(lambda: method.predict(test, size), device)
        paper = "n/a (no training)" if name not in LEARNED else \
            ("not run" if args.no_paper else f"{paper_fit(name, fit, cfg.eval.seed):.0f}")
        print(f"| {name} | {fit_s:.2f} | {args.test / pred_s:.1f} | {paper} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
