"""Connecting to Ray: a local instance unless RAY_ADDRESS names a cluster."""

from __future__ import annotations

import os

import ray

# Variables the Ray workers need to reach the object store. Local workers inherit the
# driver's environment; they are passed explicitly so a remote cluster's workers get them too.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_EC2_METADATA_DISABLED",
)


def ensure_ray() -> None:
    """ray.init() once; quiet logs, progress bars kept."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs: dict = {"log_to_driver": True, "configure_logging": False}
    if env and os.environ.get("RAY_ADDRESS") and os.environ.get("AWS_ENDPOINT_URL"):
        # An existing cluster's workers do not inherit this shell; a custom endpoint (the
        # embedded store) is in no default credential chain. Production S3 uses instance
        # profiles and needs none of this. Local instances inherit os.environ.
        kwargs["runtime_env"] = {"env_vars": env}
    ray.init(**kwargs)
