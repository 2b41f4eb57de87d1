"""Connecting to Ray: a local instance unless RAY_ADDRESS names a cluster."""

from __future__ import annotations

import os

import ray

# Where the object store is, for the workers of an existing cluster (local workers inherit
# the driver's environment). Never credentials: Ray writes a job's runtime_env in plain text
# to its logs and shows it in the dashboard. Workers take credentials from their own
# environment (instance profile, or the variables `ray start` was given).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
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
        # An existing cluster's workers do not inherit this shell, and a custom endpoint
        # (the embedded store) is in no default configuration.
        kwargs["runtime_env"] = {"env_vars": env}
    ray.init(**kwargs)
