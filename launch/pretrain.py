"""Pretraining entry point for clusters:

    ray job submit --address $RAY --working-dir . -- python launch/pretrain.py --config configs/X.yaml [key=value ...]

Joins the running Ray cluster (RAY_ADDRESS, set by `ray job submit`), or starts a local Ray.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = ap.parse_args()
    sys.exit(main(["pretrain", a.config, *a.overrides]))
