"""Joining a Ray cluster, or starting a local one, the same way for every stage."""

from __future__ import annotations

import logging
import os

from pipeline.config import RayInit
from pipeline.errors import UserError

log = logging.getLogger(__name__)


def init_ray(spec: RayInit) -> None:
    """Connect to ``spec.address`` (or RAY_ADDRESS, set by `ray job submit`); with neither,
    start a local Ray, whose workers inherit this process's environment.

    A job submitted to a cluster keeps the runtime environment it was submitted with
    (working directory, `--runtime-env-json` variables such as AWS_ENDPOINT_URL); nothing here
    overrides it. A local Ray on a dev box runs without token auth (RAY_AUTH_MODE=disabled)
    unless the environment says otherwise, so a later `ray start` + `ray job submit` keeps working.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = spec.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise UserError(
                f"cannot join the Ray cluster at {address!r}: {e}. Start it (`ray start --head`) "
                "or unset RAY_ADDRESS / ray.address to run on a local Ray."
            ) from None
        log.info("joined Ray cluster at %s", address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=spec.num_cpus, include_dashboard=False)
        log.info("started a local Ray (%s CPUs)", ray.cluster_resources().get("CPU"))
