"""Shared set-up for the benchmarks: an embedded S3 store holding synthetic cohorts."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import psutil

STORE_ROOT: list[Path] = []  # the running store's folder: its buckets are plain folders


def local_folder(uri: str) -> str:
    """The plain folder behind an ``s3://bucket/key`` of the store :func:`cohorts_in_s3` runs."""
    return str(STORE_ROOT[-1] / uri.removeprefix("s3://"))


@contextmanager
def cohorts_in_s3(sizes: list[int], matrix: int, synth: dict | None = None):
    """Start the embedded store, write one cohort per size; yields {size: s3 uri}.
    ``synth``: SynthConfig fields to change (e.g. the clinical preset's)."""
    from vfx_ray.config import SynthConfig
    from vfx_ray.services import object_store
    from vfx_ray.synth.cohort import generate_cohort

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    store = object_store.start(work / "s3", buckets=("vfx",))
    store.export()
    STORE_ROOT.append(work / "s3")
    try:
        uris = {}
        for n in sorted(set(sizes)):
            uris[n] = f"s3://vfx/cohort{n}"
            t = time.perf_counter()
            cfg = dataclasses.replace(SynthConfig(patients=n, matrix=matrix, seed=n), **(synth or {}))
            generate_cohort(uris[n], cfg, workers=2, progress=False)
            print(f"synth {n} patients: {time.perf_counter() - t:.0f} s", flush=True)
        yield uris
    finally:
        store.stop()


def plain_patients(archive: str, annotations_uri: str):
    """The single-process baseline: each object read once (pydicom), grouped by series UID,
    decoded and cropped by the same pure functions; yields (task, crops) per patient."""
    from collections import defaultdict

    from vfx_ray import storage
    from vfx_ray.config import CropConfig
    from vfx_ray.imaging import annotations, dicom, geometry

    cfg = CropConfig()
    files_by_series: dict[str, list] = defaultdict(list)
    headers = []
    for entry in storage.list_files(archive):
        data = storage.read_bytes(entry.uri)
        h = dicom.read_header(data, entry.uri)
        headers.append(h)
        files_by_series[h["series_instance_uid"]].append((entry.uri, data))
    tasks, _ = annotations.plan_tasks(annotations.read_annotations(annotations_uri), dicom.group_series(headers))
    for t in tasks:
        volume = dicom.load_volume(files_by_series[t.series_instance_uid], cfg)
        yield t, geometry.crop_samples(volume, geometry.RoiBox(*t.roi), cfg)


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants (a driver with its local Ray cluster)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Peaks(NamedTuple):
    """Peak RSS in bytes: the driver process alone, its process tree, and the driver's RSS
    split into private memory (RssAnon) and the shared memory it touched (RssShmem: the Ray
    object store's pages), each its own peak."""

    driver: int
    tree: int
    driver_private: int
    driver_shared: int


def rss_split(pid: int) -> tuple[int, int]:
    """(RssAnon, RssShmem) of a process in bytes (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem"))


def peak_rss(cmd: list[str]) -> Peaks:
    """Run a command to completion, sampling every 0.2 s the RSS of its own process and of its
    process tree; returns their peaks."""
    import subprocess

    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    ps, peaks = psutil.Process(proc.pid), [0, 0, 0, 0]
    while proc.poll() is None:
        try:
            private, shared = rss_split(proc.pid)
            now = [ps.memory_info().rss, tree_rss(ps), private, shared]
            peaks = [max(a, b) for a, b in zip(peaks, now, strict=True)]
        except (psutil.Error, OSError, KeyError):
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        err.seek(0)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.read().decode()[-3000:]}")
    return Peaks(*peaks)


def peak_rss_of(cmd: list[str]) -> int:
    """Run a command to completion, sampling its process tree's RSS every 0.2 s."""
    return peak_rss(cmd)[1]
