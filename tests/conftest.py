"""Shared fixtures: an S3-protocol server on 127.0.0.1, fresh buckets, a local Ray, small
synthetic datasets.

The environment for Ray and the AWS clients is set here, before anything starts: Ray
without token auth and without telemetry, and (for the session, once ``s3_server`` runs)
the S3 endpoint and dummy credentials, which boto3, s3fs and Ray workers pick up.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from pipeline.cli import use_interpreter_tools

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
use_interpreter_tools()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session; yields its endpoint URL.

    Sets AWS_ENDPOINT_URL and dummy AWS_* keys in os.environ (restored afterwards).
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server; returns ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray with 2 CPUs for the session (started after the S3 environment is set,
    so its workers inherit it)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def gloo_world():
    """A one-process gloo group in this process (rank 0 of 1), as Ray Train sets one up for
    a worker: DeepSpeed engines and the collectives run on it as in the training loop."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Path:
    """Synthetic datasets in four layouts (small), shared by the tests of a module."""
    from shards.synth import generate

    base = tmp_path_factory.mktemp("sources")
    generate("mvtec", base / "mvtec", classes=2, normal=6, abnormal=3, size=32, seed=1)
    generate("visa", base / "visa", classes=2, normal=4, abnormal=2, size=32, seed=2)
    generate("btad", base / "btad", classes=2, normal=4, abnormal=2, size=32, seed=3)
    return base
