"""The Ray Data datasets of the pipeline; the only module of the package that imports Ray.

Every dataset here is built the same way (:func:`_ordered`): one block per item so that
items run in parallel, output in input order (the same archive gives the same output file,
and the driver knows when a patient or chunk is complete), and a lost task reported per
patient or object by the driver instead of failing the job. Each task asks Ray for the
memory it will hold (:func:`decode_memory`), so that Ray schedules decode tasks by memory
instead of its memory monitor killing them on a crowded node.
"""

from __future__ import annotations

from typing import Any

import ray

from vfx_ray.config import CropConfig
from vfx_ray.imaging import dicom
from vfx_ray.pipeline import tasks
from vfx_ray.pipeline.shards import ShardJob, shard_batch

DECODE_MEMORY_CAP = 4 << 30
DECODE_WORKER_BYTES = 512 << 20  # the worker itself: Python, numpy, pyarrow, pydicom, SimpleITK
SERIES_BYTES_PER_VOXEL = 2  # stored CT pixels are 16-bit; compressed ones are smaller


def decode_memory(input_bytes: int, max_voxels: int = dicom.MAX_VOXELS, cap: int = DECODE_MEMORY_CAP) -> int:
    """Bytes to reserve (Ray's ``memory=``) for a task that holds ``input_bytes`` of DICOM
    objects while it decodes a series from them.

    Peak: the objects' bytes + the series as float32 (at most ``max_voxels``) + a second
    float32 copy (unevenly spaced slices are resampled into a new array) + the worker itself.
    Capped at ``cap``: the bound is a series at the refusal limit (2.4 GB a copy), while a CT
    series is typically 512 x 512 x 300-600 (0.3-0.6 GB); a request above a node's memory
    would never run, and 4 GiB still lets a 2-core 24 GiB machine (13 GiB of Ray memory)
    decode on both cores.
    """
    return int(min(cap, DECODE_WORKER_BYTES + input_bytes + 2 * 4 * max_voxels))


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _ordered(items: list[dict[str, Any]], blocks: int | None = None) -> ray.data.Dataset:
    ds = ray.data.from_items(items, override_num_blocks=max(1, blocks or len(items)))
    ds.context.execution_options.preserve_order = True  # same archive, same output file
    ds.context.max_errored_blocks = -1  # a lost task becomes TaskLost rows (passes.lost)
    return ds


def shards(items: list[dict[str, Any]], job: ShardJob, num_cpus: float = 1) -> ray.data.Dataset:
    """Wire rows of the first pass, one task per shard (:func:`shards.shards`), a block per chunk."""
    memory = decode_memory(max(tasks.CHUNK_BYTES, job.cfg.max_file_bytes))  # a chunk's objects, read whole
    return _ordered(items).map_batches(shard_batch, fn_kwargs={"job": job}, batch_format="pyarrow", batch_size=1,
                                       num_cpus=num_cpus, memory=memory)


def patients(items: list[dict[str, str]], cfg: CropConfig, num_cpus: float = 1,
             parts: tasks.CropParts | None = None) -> ray.data.Dataset:
    """Wire rows of the second pass, one task per patient (``passes.patient_items``), in order."""
    memory = decode_memory(SERIES_BYTES_PER_VOXEL * dicom.MAX_VOXELS)  # a whole series' objects
    return _ordered(items).map_batches(
        tasks.patient_batch, fn_kwargs={"cfg": cfg, "parts": parts}, batch_format="pyarrow", batch_size=1,
        num_cpus=num_cpus, memory=memory)
