"""The served model's inspect input: a DataFrame of images -> scores and decisions.

The DataFrame has one row per image and one of two columns: ``image`` (the encoded PNG/JPEG/...
bytes, base64) or ``path`` (a path on the server's file system). Rows that cannot be decoded get
no score and the reason in ``error``; every row gets an answer, in order.
"""

from __future__ import annotations

import base64
import binascii

import torch

from pipeline.inspect.images import load, load_bytes
from pipeline.inspect.score import Inspector
from shards.errors import UserError

INPUT_COLUMNS = ("image", "path")
OUTPUT_COLUMNS = ("score", "decision", "error")


def _decode_row(column: str, value, size: int) -> tuple[torch.Tensor | None, str | None]:
    if not isinstance(value, str) or not value:
        return None, f"{column}: expected a non-empty string, got {type(value).__name__}"
    if column == "path":
        return load(value, size)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        return None, f"image: not base64 ({e})"
    return load_bytes(data, size)


def input_column(frame) -> str:
    found = [c for c in INPUT_COLUMNS if c in frame.columns]
    if len(found) != 1:
        raise UserError(f"the inspect input is a DataFrame with one column 'image' (base64-encoded PNG/JPEG bytes) "
                        f"or 'path' (image files on the server); got columns {list(frame.columns)}")
    return found[0]


def score_frame(inspector: Inspector, frame):
    """A DataFrame (score, decision, error) with one row per row of ``frame``."""
    import pandas as pd

    column = input_column(frame)
    size = inspector.state.image_size
    decoded = [_decode_row(column, v, size) for v in frame[column].tolist()]
    ok = [i for i, (t, _) in enumerate(decoded) if t is not None]
    out = [{"score": None, "decision": None, "error": err} for _, err in decoded]
    if ok:
        _, scores = inspector.score_all(torch.stack([decoded[i][0] for i in ok]))
        for i, s in zip(ok, scores.tolist()):
            out[i]["score"] = float(s)
            out[i]["decision"] = inspector.decide(s)
    # object columns: a missing score or error stays None (JSON null), not NaN
    return pd.DataFrame({c: pd.Series([r[c] for r in out], dtype=object) for c in OUTPUT_COLUMNS})
