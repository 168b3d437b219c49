"""Joining a Ray cluster, or starting a local one, the same way for every stage."""

from __future__ import annotations

import logging
import os

from pipeline.config import RayInit
from pipeline.errors import UserError

log = logging.getLogger(__name__)


def init_ray(spec: RayInit, runtime_env: dict | None = None) -> None:
    """Connect to ``spec.address`` (or RAY_ADDRESS); with neither, start a local Ray.

    A local Ray on a dev box runs without token auth (RAY_AUTH_MODE=disabled) unless the
    environment says otherwise, so a later `ray start` + `ray job submit` keeps working.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = spec.address or os.environ.get("RAY_ADDRESS")
    # Workers import this project's packages and read the same tracking settings.
    env = {"env_vars": {k: os.environ[k] for k in _FORWARDED if k in os.environ}}
    if runtime_env:
        env.update(runtime_env)
    if address:
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise UserError(
                f"cannot join the Ray cluster at {address!r}: {e}. Start it (`ray start --head`) "
                "or unset RAY_ADDRESS / ray.address to run on a local Ray."
            ) from None
        log.info("joined Ray cluster at %s", address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=spec.num_cpus, include_dashboard=False, runtime_env=env)
        log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))


_FORWARDED = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_DISABLE_TELEMETRY",
    "TORCH_EXTENSIONS_DIR",
    "DS_ACCELERATOR",
    "PYTHONPATH",
)
