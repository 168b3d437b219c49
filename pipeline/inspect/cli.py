"""`adpretrain inspect` and `adpretrain export-onnx`: their arguments and what they run.

Errors a user can cause raise :class:`shards.errors.UserError`; ``pipeline.cli.main`` prints them
as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time

from pipeline.inspect.fit import METHODS
from shards.errors import UserError
from shards.storage import mask_secrets

DEFAULTS = {"method": "patchcore", "k_shot": 8, "fpr": 0.01, "seed": 0}


def _show(text: str) -> None:
    print(mask_secrets(text))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="URI_OR_FOLDER",
                   help="models:/NAME@alias, models:/NAME/3, runs:/RUN/projector, or an exported model folder")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for a registry URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def _inspect_parser(sub) -> None:
    desc = ("score images of a product with an exported projector: fit (K-shot references, the method, a threshold "
            "at a false-positive rate) on good images, or reuse a saved state; write scores, decisions, maps")
    p = sub.add_parser("inspect", help="score images of a new product (anomaly maps, decisions)", description=desc)
    _model_args(p)
    p.add_argument("--good", metavar="DIR", help="folder of good images of the product (needed unless --state)")
    p.add_argument("--method", choices=METHODS, default=None, help=f"default {DEFAULTS['method']}")
    p.add_argument("--k-shot", type=int, default=None, help=f"reference images (default {DEFAULTS['k_shot']})")
    p.add_argument("--fpr", type=float, default=None,
                   help=f"false-positive rate on good images the threshold allows (default {DEFAULTS['fpr']}; "
                        "needs at least ceil(1/fpr) calibration images)")
    p.add_argument("--calib-fraction", type=float, default=0.5,
                   help="PatchCore/PaDiM: share of the non-reference good images that calibrates (the rest fits)")
    p.add_argument("--seed", type=int, default=None, help="seed of the reference/fit/calibration split (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (torch's current device) or cuda:N")
    p.add_argument("--fp32", action="store_true",
                   help="run the backbone in float32 even when the model asks for bf16 autocast (as the ONNX graph)")
    p.add_argument("--state", metavar="DIR", help="reuse a saved state (OUT/state of an earlier run): no fitting")
    p.add_argument("--out", required=True, metavar="DIR", help="results.csv, results.json, maps/, state/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files or folders (recursive)")
    p.set_defaults(func=cmd_inspect)


def _export_parser(sub) -> None:
    desc = ("export the fused inspection graph of a model and a saved inspect state to ONNX (dynamic batch) and "
            "check it with onnxruntime against torch")
    p = sub.add_parser("export-onnx", help="the model + an inspect state as one ONNX graph", description=desc)
    _model_args(p)
    p.add_argument("--state", required=True, metavar="DIR", help="the inspect state (OUT/state of `adpretrain inspect`)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--check", nargs="*", default=None, metavar="IMAGES_OR_DIRS",
                   help="images for the onnxruntime check (default: seeded random images)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest score difference to torch accepted, "
                   "plus --rtol times the largest score")
    p.add_argument("--rtol", type=float, default=1e-5, help="see --atol (scores' scale depends on the method)")
    p.set_defaults(func=cmd_export_onnx)


def add_commands(sub) -> None:
    """Register `inspect` and `export-onnx` on the `adpretrain` subparsers."""
    _inspect_parser(sub)
    _export_parser(sub)


def _reused_state(args, ref):
    """The state of ``--state``, checked against the model and the flags given."""
    from pipeline.inspect.state import check_model, load_state

    state = load_state(args.state)
    check_model(state, ref.digest, ref.label, args.state)
    given = {"method": args.method, "k_shot": args.k_shot, "fpr": args.fpr, "seed": args.seed}
    for key, value in given.items():
        if value is not None and value != getattr(state, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {value}: the state {args.state} was fitted with {flag} {getattr(state, key)}; "
                            f"drop {flag} to reuse it, or fit a new state (--good without --state)")
    if args.fp32 and state.bf16:
        raise UserError(f"--fp32: the state {args.state} was fitted with the backbone under bf16 autocast; "
                        "fit a new state with --fp32 (--good without --state)")
    state.model = ref.info()  # the same export (same digest), named as this run names it
    return state


def _setting(args, key: str):
    value = getattr(args, key)
    return DEFAULTS[key] if value is None else value


def _prepare(args):
    """(model, extractor, state, inspector, inputs, non-image files) of an inspect run."""
    from pipeline.export import load_feature_extractor
    from pipeline.inspect.fit import FitSettings, fit_state, plan_fit
    from pipeline.inspect.images import find_inputs
    from pipeline.inspect.model import resolve_device, resolve_model
    from pipeline.inspect.score import Inspector

    if not args.state and not args.good:
        raise UserError("--good DIR is needed to fit a state (or pass --state DIR to reuse a saved one)")
    if args.good and not args.state and not os.path.isdir(args.good):
        raise UserError(f"--good {args.good!r} is not a folder")
    device = resolve_device(args.device)
    inputs, ignored = find_inputs(args.images)
    if not inputs:
        raise UserError(f"no image files under {', '.join(args.images)} (extensions jpg, png, bmp, tif)")
    settings = FitSettings(method=_setting(args, "method"), k_shot=_setting(args, "k_shot"),
                           fpr=_setting(args, "fpr"), seed=_setting(args, "seed"), calib_fraction=args.calib_fraction)
    split = None if args.state else plan_fit(args.good, settings)
    ref = resolve_model(args.model, args.tracking_uri)
    fx = load_feature_extractor(ref.folder, device)
    if args.state:
        state = _reused_state(args, ref)
        return ref, fx, state, Inspector.create(fx, state), inputs, ignored
    settings = dataclasses.replace(settings, bf16=fx.backbone.bf16 and not args.fp32)
    state, inspector = fit_state(fx, ref.info(), split, settings)
    return ref, fx, state, inspector, inputs, ignored


def cmd_inspect(args) -> int:
    from pipeline.inspect.results import summary, write_results
    from pipeline.inspect.score import inspect_inputs
    from pipeline.inspect.state import save_state

    start = time.perf_counter()
    ref, fx, state, inspector, inputs, ignored = _prepare(args)
    state_dir = os.path.join(args.out, "state")
    if not args.state or os.path.abspath(args.state) != os.path.abspath(state_dir):
        save_state(state, state_dir)
    shutil.rmtree(os.path.join(args.out, "maps"), ignore_errors=True)  # no pictures of an earlier run stay
    rows = inspect_inputs(inspector, inputs, args.out, progress=not args.no_progress)
    write_results(args.out, rows, state, ignored)
    _show(summary(rows, state, args.out, args.state, ignored, time.perf_counter() - start))
    return 0


def _check_images(paths: list[str], size: int):
    import torch

    from pipeline.inspect.images import find_inputs, load

    inputs, _ = find_inputs(paths)
    loaded = [(i.path, *((None, i.error) if i.error else load(i.path, size))) for i in inputs]
    bad = [f"{p}: {e}" for p, t, e in loaded if t is None]
    if bad or not loaded:
        raise UserError("--check: " + ("; ".join(bad) if bad else f"no image files under {', '.join(paths)}"))
    return torch.stack([t for _, t, _ in loaded])


def cmd_export_onnx(args) -> int:
    from pipeline.export import load_feature_extractor
    from pipeline.inspect.model import resolve_model
    from pipeline.inspect.onnx import check_onnx, export_onnx
    from pipeline.inspect.state import check_model, load_state

    ref = resolve_model(args.model, args.tracking_uri)
    state = load_state(args.state)
    check_model(state, ref.digest, ref.label, args.state)
    fx = load_feature_extractor(ref.folder, "cpu")
    path = export_onnx(fx, state, args.out, opset=args.opset)
    images = _check_images(args.check, state.image_size) if args.check else None
    report = check_onnx(path, fx, state, images, source="check images" if args.check else "")
    _show(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB; method {state.method}, threshold "
          f"{state.threshold:.6g}, input images (B, 3, {state.image_size}, {state.image_size}) in [0, 1])")
    _show(report.table())
    allowed = args.atol + args.rtol * report.score_max
    if report.score_diff_graph > allowed:
        raise UserError(f"{path}: onnxruntime's scores differ from torch's by {report.score_diff_graph:.3g} "
                        f"(> --atol {args.atol} + --rtol {args.rtol} x the largest score {report.score_max:.3g}); "
                        "the export is not faithful, do not use it")
    return 0
