"""Where a job's work may run: the cluster's shape, the GPU choice, the drivers' resource and
the shared-storage rule. Pure (no Ray): ``session.cluster_shape`` reads a live cluster.

Designed for an autoscaling cluster whose GPU workers start at zero: what the cluster *can*
have (its launcher config) counts, not only what it has at submit time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vfx_ray import storage
from vfx_ray.errors import VfxError

# The head advertises this custom resource (cluster.yaml, the test clusters); fold and trial
# drivers ask for one unit, so they stay on the head: a spot reclaim of a worker then never
# takes a trial, its Train controller and its data coordinator down together.
DRIVER_RESOURCE = "vfx_driver"
# Without it (a laptop, a fixed cluster) a driver asks for memory and no CPU: it only waits on
# its trainer, whose workers hold the CPUs. Not even a sliver of one: a node with 0.98 of its
# single CPU left runs no 1-CPU task, and the next fold's Ray Data set-up would wait on the
# running fold's workers for good (seen on a 2 x 1-CPU cluster). Tune refuses an empty request.
DRIVER_MEMORY = 512 << 20


@dataclass(frozen=True)
class ClusterShape:
    """What a job needs to know of the cluster to place its work."""

    nodes: int = 1  # alive now
    gpus: int = 0  # on alive nodes now
    max_gpus: int = 0  # the most it can have (autoscaler included); >= gpus
    autoscaling: bool = False  # an autoscaler can add nodes
    driver_resource: bool = False  # the head advertises DRIVER_RESOURCE

    @property
    def needs_shared_storage(self) -> bool:
        """Work may land on another machine than the driver's."""
        return self.nodes > 1 or self.autoscaling


def use_gpu(flag: bool | None, shape: ClusterShape) -> bool:
    """``--gpu``/``--no-gpu`` when given; otherwise GPUs whenever the cluster has or can get them."""
    return shape.max_gpus > 0 if flag is None else flag


def driver_resources(shape: ClusterShape) -> dict[str, float]:
    """A fold or trial driver's request (Tune's ``with_resources`` form)."""
    return {"cpu": 0, DRIVER_RESOURCE: 1} if shape.driver_resource else {"cpu": 0, "memory": DRIVER_MEMORY}


def launcher_capacity(config: Mapping[str, Any]) -> tuple[bool, int]:
    """(can add nodes, most GPUs) from a Ray cluster-launcher config (``available_node_types``)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    grows, gpus = False, 0
    for name, node_type in types.items():
        count = 1 if name == head else int(node_type.get("max_workers", 0) or 0)
        grows = grows or (name != head and count > int(node_type.get("min_workers", 0) or 0))
        gpus += count * int((node_type.get("resources") or {}).get("GPU", 0) or 0)
    return grows, gpus


def on_shared_fs(path: str, shared_fs: Iterable[str]) -> bool:
    """``path`` lies under one of the user-declared shared mounts (e.g. /mnt/efs)."""
    real = os.path.abspath(path)
    return any(os.path.commonpath([real, os.path.abspath(root)]) == os.path.abspath(root) for root in shared_fs)


def check_shared_storage(paths: Mapping[str, str | None], shape: ClusterShape, shared_fs: Iterable[str] = ()) -> None:
    """Refuse a local path (named by its flag) that other nodes of this cluster could not see."""
    if not shape.needs_shared_storage:
        return
    roots = list(shared_fs)
    for flag, uri in paths.items():
        if uri and not storage.is_s3(uri) and not on_shared_fs(uri, roots):
            where = f"{shape.nodes}-node cluster" + (" with an autoscaler" if shape.autoscaling else "")
            raise VfxError(
                "submit",
                f"{flag} {uri} is a local path, but this is a {where} whose other nodes cannot see "
                f"it: use s3://BUCKET/... (or --shared-fs MOUNT if every node mounts {uri})",
            )
