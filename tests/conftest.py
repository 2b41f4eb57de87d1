"""Shared fixtures: one embedded S3 store and one Ray session for the whole test run.

The store starts first and exports the standard AWS variables, so Ray's workers (which
inherit the driver's environment at ``ray.init``) reach it too.
"""

from __future__ import annotations

import os

import pytest

from vfx_ray import objectstore

AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients find the dashboard


@pytest.fixture(scope="session")
def objectstore_server(tmp_path_factory):
    """A running rclone S3 server on loopback, its variables exported in os.environ."""
    saved = {k: os.environ.get(k) for k in AWS_VARS}
    root = tmp_path_factory.mktemp("s3root")
    store = objectstore.start(root, buckets=("vfx", "test"), log_file=root.parent / "rclone.log")
    store.export()
    yield store
    store.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(objectstore_server):
    """One local Ray instance for every test that needs it (ray.init costs ~10 s here).

    With its dashboard: Ray Train's PlacementGroupCleaner frees the workers of a trial that
    ASHA stopped through the State API, which the dashboard serves. Its workers are told where
    (RAY_API_SERVER_ADDRESS, inherited from this process): left to find the cluster by itself,
    the State API gives up when this machine runs another Ray instance, and the next trial
    would wait forever for the leaked CPUs.
    """
    import ray

    if not ray.is_initialized():
        port = objectstore.free_port()
        os.environ[STATE_API_ENV] = f"http://127.0.0.1:{port}"
        ray.init(
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
    os.environ.pop(STATE_API_ENV, None)
