"""Build the WebDataset shards of a config, on a local Ray or on the cluster this runs in.

    python launch/build_shards.py --config configs/x.yaml [key.sub=value ...]
    ray job submit --address $RAY --working-dir . -- python launch/build_shards.py --config configs/x.yaml

Prints the summary table; errors a user can cause exit with status 2 and one message.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import ConfigError, load_config  # noqa: E402
from shards.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        from pipeline.stages import Context, shards as shards_stage
        from shards.manifest import summary_table

        cfg = load_config(args.config, args.overrides)
        manifest = shards_stage.run(cfg, Context(progress=not args.no_progress))
    except (ConfigError, UserError) as e:
        print(f"build_shards: error: {e}", file=sys.stderr)
        return 2
    print(summary_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
