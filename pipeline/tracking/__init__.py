"""Everything MLflow: the tracking store, one run per training run, checkpoints, the model registry.

- :mod:`~pipeline.tracking.store`: the store (sqlite or a tracking server), made usable once.
- :mod:`~pipeline.tracking.writer`: retries and the background writer that never stops training.
- :mod:`~pipeline.tracking.runs`: :class:`RunTracker`, and reading runs back.
- :mod:`~pipeline.tracking.registry`: model versions, champion/challenger, downloading a model.
- :mod:`~pipeline.tracking.pyfunc`: the registered model as an MLflow pyfunc.

Nothing outside this package imports MLflow.
"""

from pipeline.tracking.pyfunc import _load_pyfunc  # MLflow loads every registered version through the package
from pipeline.tracking.store import ensure_store, resolve_uri
from pipeline.tracking.writer import Retry
from pipeline.tracking.registry import load_registered, model_version, select_champion
from pipeline.tracking.runs import (
    RUN_NAME_TAG,
    RunTracker,
    checkpoint_artifact,
    checkpoint_steps,
    download_checkpoint,
    metric_histories,
    run_exists,
)

__all__ = [
    "RUN_NAME_TAG",
    "_load_pyfunc",
    "Retry",
    "RunTracker",
    "checkpoint_artifact",
    "checkpoint_steps",
    "download_checkpoint",
    "ensure_store",
    "load_registered",
    "metric_histories",
    "model_version",
    "resolve_uri",
    "run_exists",
    "select_champion",
]
