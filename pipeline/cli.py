"""`adpretrain` command line: one subcommand per stage, plus `run` for the whole chain.

Every config-driven subcommand takes ``CONFIG [key.sub=value ...]``; the config is
validated before any work starts. Errors a user can cause end in one message on
stderr and exit code 2, without a traceback (credentials in URLs masked). SIGINT and
SIGTERM end a command in order: one message, exit code 128 + the signal's number, and
the local Ray it started shut down, as on every other way out.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable

from pipeline.config import ConfigError, load_config
from shards.errors import UserError
from pipeline.hostmem import retain_freed_memory
from pipeline.rayctx import shutdown_local_ray
from shards.storage import mask_secrets

log = logging.getLogger("adpretrain")


def show(text: str, end: str = "\n") -> None:
    """Print what a command reports, with the credentials of URLs masked."""
    print(mask_secrets(text), end=end)


def _config_command(sub, name: str, help: str, handler: Callable, extra: Callable | None = None) -> None:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    if extra is not None:
        extra(p)
    p.set_defaults(func=lambda args: handler(load_config(args.config, _overrides(args)), args))


def _overrides(args) -> list[str]:
    """The command line's ``key=value`` overrides, with ``--profile`` as ``train.profile.enabled=true``."""
    return [*(["train.profile.enabled=true"] if getattr(args, "profile", False) else []), *args.overrides]


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", action="store_true",
                   help="profile the training loop (rank 0, train.profile.start/steps): trace, per-phase and per-operator "
                   "tables in the run folder's profile/ and in MLflow")


def _cmd_build_shards(cfg, args) -> int:
    from pipeline.stages import Context, shards as shards_stage
    from shards.manifest import summary_table

    manifest = shards_stage.run(cfg, Context(progress=True))
    show(summary_table(manifest))
    return 0


def _cmd_refbank(cfg, args) -> int:
    from pipeline.stages import Context, refbank

    out = refbank.run(cfg, Context(progress=True))
    show(f"reference bank: {out}")
    return 0


def _cmd_centers(cfg, args) -> int:
    from pipeline.stages import Context, centers

    out = centers.run(cfg, Context(progress=True))
    show(f"centers: {out}")
    return 0


def _cmd_pretrain(cfg, args) -> int:
    from pipeline.launcher import pretrain

    result = pretrain(cfg)
    show(result.describe())
    return 0


def _cmd_evaluate(cfg, args) -> int:
    from pipeline.evaluate.jobs import evaluate

    result = evaluate(cfg, model=args.model, checkpoint=args.checkpoint)
    show(result.describe())
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="MLflow model URI, e.g. models:/adpretrain-projector@champion")
    g.add_argument("--checkpoint", help="exported projector folder or checkpoint path")


def _cmd_curve(cfg, args) -> int:
    from pipeline.evaluate.curve import build_curve

    show(build_curve(cfg).describe())
    return 0


def _cmd_run(cfg, args) -> int:
    from pipeline.run import run_chain

    result = run_chain(cfg)
    show(result.describe())
    return 0


def _cmd_config(args) -> int:
    from pipeline.config import reference_markdown

    if args.config is None:
        print(reference_markdown())
    else:
        cfg = load_config(args.config, args.overrides)
        import yaml

        show(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adpretrain",
        description="Anomaly-representation pretraining: shards, reference bank, distributed pretraining, evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from shards import synth

    p = sub.add_parser("synth", help="write synthetic industrial AD data in a public dataset's layout")
    synth.add_arguments(p)
    p.set_defaults(func=lambda args: print(synth.generate_from_args(args).table()))

    _config_command(sub, "build-shards", "pack the configured sources into WebDataset shards", _cmd_build_shards)
    _config_command(sub, "refbank", "encode the reference bank of normal images", _cmd_refbank)
    _config_command(sub, "centers", "compute the per-level centers of normal residual features", _cmd_centers)
    _config_command(sub, "pretrain", "distributed pretraining on Ray Train + DeepSpeed", _cmd_pretrain,
                    extra=_profile_args)
    _config_command(sub, "evaluate", "downstream evaluation jobs", _cmd_evaluate, extra=_eval_args)
    _config_command(sub, "curve", "the validation curve: every training checkpoint of the config's pretraining "
                    "run evaluated on the val sources", _cmd_curve)
    _config_command(sub, "run", "the whole chain: data, shards, bank, centers, pretrain, evaluate (and the curve "
                    "with eval.curve)", _cmd_run, extra=_profile_args)

    from pipeline.inspect.cli import add_commands as add_inspect_commands

    add_inspect_commands(sub)  # inspect, export-onnx

    p = sub.add_parser("config", help="print the config reference, or a validated config with defaults")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=_cmd_config)
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def use_interpreter_tools() -> None:
    """Put this interpreter's bin folder first on PATH (for us and the Ray workers we start):
    DeepSpeed JIT-builds its ops with the `ninja` found on PATH, and switching between the
    environment's ninja and the system's forces a full rebuild."""
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread where the command is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):  # one orderly shutdown: a repeated Ctrl-C cannot cut it short
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides taken on both sides of the options
    (``evaluate CONFIG --model URI name=x``: argparse alone stops the overrides at the option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    use_interpreter_tools()
    args = parse(argv)
    setup_logging(args.verbose)
    retain_freed_memory()
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as e:
        print(f"adpretrain {args.command}: error: {mask_secrets(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"adpretrain {args.command}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        shutdown_local_ray()
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
