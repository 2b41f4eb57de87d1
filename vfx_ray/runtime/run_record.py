"""A run folder's settings, written once: continuing a run (train-cv, tune) with other
settings is refused, because its finished parts were computed with the first ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from vfx_ray import storage
from vfx_ray.errors import VfxError

# How a run executes, not what it computes (checkpoint_every: how much a restart redoes;
# folds_per_gpu and compile: how fast). An old record without a field compares as if it had
# none, so a run folder made before a runtime field existed still resumes.
RUNTIME_FIELDS = ("num_workers", "use_gpu", "gpu_worker_cpus", "checkpoint_every", "folds_per_gpu", "compile")


def without_runtime(train: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train.items() if k not in RUNTIME_FIELDS}


def changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ; one level into sections that are dicts on both sides (dotted)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        elif a != b:
            out.append(k)
    return out


def pin(
    out_uri: str, name: str, record: dict[str, Any], comparable: Callable[[dict], dict], stage: str, what: str
) -> None:
    """Write ``record`` as ``out_uri/name`` the first time; later, refuse a record whose
    ``comparable`` part differs from the one written."""
    uri = storage.join(out_uri, name)
    if not storage.exists(uri):
        storage.write_text(uri, json.dumps(record, indent=2, sort_keys=True))
        return
    old = comparable(json.loads(storage.read_text(uri)))
    new = comparable(json.loads(json.dumps(record)))  # same JSON round trip as the stored one
    if old != new:
        raise VfxError(
            stage, f"{out_uri} holds {what} with different settings ({', '.join(changed(old, new))}); use a new --out"
        )
