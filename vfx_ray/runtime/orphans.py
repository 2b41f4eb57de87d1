"""Free the worker placement groups of Train runs whose controller is gone (public APIs only).

A Tune trial here is a Train V2 driver. When ASHA stops it, or a search is interrupted, the
trial actor is killed and its Train controller dies with it, but the workers' placement group
belongs to the job: until the job ends it holds the CPUs/GPUs the next trials wait for.
Ray Train's own detached PlacementGroupCleaner is meant to free it, but it frees only a group
it was told of, and a controller killed between creating its group and its workers can leave
one it never learns of (seen here: all four cleaners of an interrupted search exited, one
group that never got workers stayed reserved, and the resumed search waited forever for its
CPU). So the Tune driver also sweeps:
a placement group of this job that is CREATED, has held Train workers and holds no live
actor any more - or has held none for ``GRACE_S`` - is an orphan and is removed.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import ray.tune
from ray.util.placement_group import PlacementGroup, remove_placement_group

GRACE_S = 60.0  # a new worker group's actors are submitted right after its group is ready
CHECK_EVERY_S = 2.0


def orphaned(groups: dict[str, dict], actors: list[Any], job_id: str, worker_bundle: dict[str, float],
             empty_since: dict[str, float], now: float) -> list[str]:
    """Ids of this job's CREATED worker groups (every bundle is ``worker_bundle``) that hold no
    live actor: at once when they held workers, after GRACE_S when they never held any
    (``empty_since`` is updated). Pure over the State API's two listings."""
    alive: set[str] = set()
    used: set[str] = set()
    for a in actors:
        if a.placement_group_id:
            (used if a.state == "DEAD" else alive).add(a.placement_group_id)
    out = []
    for pg_id, pg in groups.items():
        workers = bool(pg["bundles"]) and all(b == worker_bundle for b in pg["bundles"])
        if pg["state"] != "CREATED" or pg["creator_job_id"] != job_id or not workers or pg_id in alive:
            empty_since.pop(pg_id, None)
            continue
        first = empty_since.setdefault(pg_id, now)
        if pg_id in used or now - first >= GRACE_S:
            out.append(pg_id)
    return out


class ReleaseOrphanedWorkers(ray.tune.Callback):
    """A Tune callback running the sweep in the Tune driver, every CHECK_EVERY_S seconds and
    once more when the experiment ends. ``worker_bundle``: one Train worker's resources
    (``train.worker_resources``), which tells its groups from Tune's own."""

    def __init__(self, worker_bundle: dict[str, float]) -> None:
        self.worker_bundle = {k: float(v) for k, v in worker_bundle.items()}
        self._empty_since: dict[str, float] = {}
        self._next = 0.0

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker_bundle,))

    def sweep(self) -> list[str]:
        from ray.util.state import list_actors, list_placement_groups

        job = ray.get_runtime_context().get_job_id()
        try:
            listed = list_placement_groups(filters=[("state", "=", "CREATED")], detail=True, limit=10_000,
                                           raise_on_missing_output=False)
            actors = list_actors(filters=[("job_id", "=", job)], detail=True, limit=10_000,
                                 raise_on_missing_output=False)
        except Exception:  # the State API is down for a moment: try again at the next step
            return []
        groups = {g.placement_group_id: {"state": g.state, "creator_job_id": g.creator_job_id,
                                         "bundles": [b.get("unit_resources") for b in g.bundles or []]}
                  for g in listed}
        removed = orphaned(groups, actors, job, self.worker_bundle, self._empty_since, time.monotonic())
        for pg_id in removed:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            self._empty_since.pop(pg_id, None)
        return removed

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + CHECK_EVERY_S
            self.sweep()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.sweep()
