"""Evaluation entry point for clusters:

    ray job submit --address $RAY --working-dir . -- python launch/evaluate.py --config configs/X.yaml \
        [--model models:/adpretrain-projector@champion | --checkpoint EXPORT_FOLDER] [key=value ...]

Without --model or --checkpoint it evaluates the export of the config's own pretraining run.
Joins the running Ray cluster (RAY_ADDRESS, set by `ray job submit`), or starts a local Ray;
one Ray task per (dataset, class, method, feature kind).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--model", help="MLflow model URI, e.g. models:/adpretrain-projector@champion")
    g.add_argument("--checkpoint", help="exported projector folder")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = ap.parse_args()
    extra = ["--model", a.model] if a.model else ["--checkpoint", a.checkpoint] if a.checkpoint else []
    sys.exit(main(["evaluate", a.config, *a.overrides, *extra]))
