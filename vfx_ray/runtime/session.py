"""Connecting to Ray: a local instance unless RAY_ADDRESS names a cluster."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import ray
import yaml

from vfx_ray.runtime.placement import DRIVER_RESOURCE, ClusterShape, launcher_capacity

VERBOSE_ENV = "VFX_RAY_VERBOSE"  # set by --verbose; VFX_RAY_DEBUG=1 implies it
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"  # where ray.util.state finds the dashboard
# The cluster launcher's autoscaler config on the head, where `ray job submit` runs drivers.
LAUNCHER_CONFIG_ENV = "VFX_RAY_AUTOSCALER_CONFIG"
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"

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
    """ray.init() once (connects when RAY_ADDRESS is set); quiet unless verbose."""
    if ray.is_initialized():
        return
    verbose = is_verbose()
    # A readable console by default: progress bars and a line per fold/trial. Ray's own logs
    # stay in the session's log files and the dashboard (--verbose / VFX_RAY_DEBUG=1 shows them).
    kwargs: dict = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    # The Ray Dashboard's Train page lists runs only with state tracking on (read by the Train
    # driver, which on a local instance inherits this process's environment).
    os.environ.setdefault(STATE_TRACKING_ENV, "1")
    if not verbose:  # Tune's newer console prints a table per run even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    env = worker_env(os.environ)
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
        # Under `ray job submit` the job's own runtime_env may name the same variables; its
        # values are this process's environment, so ours may take their place.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    context = ray.init(**kwargs)
    if not verbose:
        quiet_ray_data()
    if context.dashboard_url:  # the State API of *this* cluster, even where others run too
        os.environ.setdefault(STATE_API_ENV, f"http://{context.dashboard_url}")


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The FORWARDED_ENV variables that are set, when joining an existing cluster (RAY_ADDRESS):
    its workers do not inherit this shell, and a custom endpoint or a region is in no default
    configuration. Empty for a local instance, whose workers inherit the environment."""
    if environ.get("RAY_ADDRESS", "local") in ("", "local"):
        return {}
    return {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}


def quiet_ray_data() -> None:
    """Ray Data logs each dataset's plan and start at INFO on the console; keep them in its
    log file (ray-data.log in the session folder) and show only warnings. Its bars stay."""
    import ray.data  # noqa: F401 - configures the "ray.data" loggers

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def is_verbose() -> bool:
    return bool(os.environ.get(VERBOSE_ENV) or os.environ.get("VFX_RAY_DEBUG"))


@functools.cache
def cluster_shape() -> ClusterShape:
    """The connected cluster's shape: nodes and GPUs now, and what its autoscaler can add.

    The autoscaler's capacity comes from the cluster launcher's config, which the launcher
    puts on the head (``~/ray_bootstrap_config.yaml``; ``$VFX_RAY_AUTOSCALER_CONFIG`` names
    another): Ray has no public API for it. Elsewhere (KubeRay, a fixed cluster) only the
    alive nodes count; pass --gpu there if GPU workers start at zero.
    """
    ensure_ray()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    gpus = int(sum(n.get("Resources", {}).get("GPU", 0) for n in alive))
    driver = any(n.get("Resources", {}).get(DRIVER_RESOURCE) for n in alive)
    path = Path(os.environ.get(LAUNCHER_CONFIG_ENV) or LAUNCHER_CONFIG).expanduser()
    grows, max_gpus = launcher_capacity(yaml.safe_load(path.read_text()) or {}) if path.is_file() else (False, 0)
    return ClusterShape(
        nodes=len(alive), gpus=gpus, max_gpus=max(gpus, max_gpus), autoscaling=grows, driver_resource=driver
    )
