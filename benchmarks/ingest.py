"""Crops from an S3 archive: the Ray Data pipeline vs a plain single-process loop.

Both read the same synthetic archive from the embedded S3 store and produce the same crops
(the loop calls the same pure functions: pydicom decode, SimpleITK crops). Prints patients/s
for each and their ratio, measured in the same run; then peak RSS of the whole job (driver +
Ray processes) for two archive sizes, each in a fresh process, and their ratio.

    .venv/bin/python benchmarks/ingest.py --patients 50 --memory-sizes 50,200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil


def plain_loop(archive: str, annotations_uri: str) -> int:
    """The baseline: one process, each object read once, same grouping and crops."""
    from vfx_ray import annotations, dicom, geometry, storage
    from vfx_ray.config import CropConfig

    cfg = CropConfig()
    files_by_series: dict[str, list] = defaultdict(list)
    headers = []
    for entry in storage.list_files(archive):
        data = storage.read_bytes(entry.uri)
        h = dicom.read_header(data, entry.uri)
        headers.append(h)
        files_by_series[h["series_instance_uid"]].append((entry.uri, data))
    tasks, _ = annotations.plan_tasks(annotations.read_annotations(annotations_uri), dicom.group_series(headers))
    n = 0
    for t in tasks:
        volume = dicom.load_volume(files_by_series[t.series_instance_uid], cfg)
        n += len(geometry.crop_samples(volume, geometry.RoiBox(*t.roi), cfg))
    return n


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure_memory(archive: str, annotations_uri: str) -> int:
    """Peak RSS of a fresh `vfx-ray crops` process tree (driver, raylet, workers)."""
    out = tempfile.mkdtemp(prefix="bench-crops-")
    cmd = [sys.executable, "-m", "vfx_ray.cli", "crops", "--archive", archive, "--annotations", annotations_uri, "--out", out, "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"crops failed: {cmd}")
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=50, help="archive size for the throughput comparison")
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--memory-sizes", default="50,200", help="archive sizes for peak RSS ('' to skip)")
    args = ap.parse_args()

    import ray

    from vfx_ray import objectstore
    from vfx_ray.config import SynthConfig
    from vfx_ray.ingest import run_crops
    from vfx_ray.synth.cohort import generate_cohort

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    store = objectstore.start(work / "s3", buckets=("vfx",))
    store.export()
    sizes = sorted({args.patients, *[int(s) for s in args.memory_sizes.split(",") if s]})
    try:
        cohorts = {}
        for n in sizes:
            cohorts[n] = f"s3://vfx/cohort{n}"
            t = time.perf_counter()
            generate_cohort(cohorts[n], SynthConfig(patients=n, matrix=args.matrix, seed=n), workers=2, progress=False)
            print(f"synth {n} patients: {time.perf_counter() - t:.0f} s", flush=True)
        base = cohorts[args.patients]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_crops(f"{cohorts[sizes[0]]}/dicom", f"{cohorts[sizes[0]]}/annotations.csv", "s3://vfx/warmup", progress=False)
        t = time.perf_counter()
        summary = run_crops(f"{base}/dicom", f"{base}/annotations.csv", "s3://vfx/bench-out", progress=False)
        ray_s = time.perf_counter() - t
        ray.shutdown()
        t = time.perf_counter()
        n_loop = plain_loop(f"{base}/dicom", f"{base}/annotations.csv")
        loop_s = time.perf_counter() - t
        assert n_loop == summary["crops"], (n_loop, summary["crops"])
        result = {
            "patients": args.patients,
            "matrix": args.matrix,
            "crops": n_loop,
            "ray_data_patients_per_s": round(args.patients / ray_s, 2),
            "plain_loop_patients_per_s": round(args.patients / loop_s, 2),
            "speedup_ray_vs_loop": round(loop_s / ray_s, 2),
        }
        print(json.dumps(result), flush=True)
        if len(sizes) > 1 and args.memory_sizes:
            small, large = int(args.memory_sizes.split(",")[0]), int(args.memory_sizes.split(",")[-1])
            peaks = {n: measure_memory(f"{cohorts[n]}/dicom", f"{cohorts[n]}/annotations.csv") for n in (small, large)}
            print(json.dumps({
                f"peak_rss_mb_{small}": round(peaks[small] / 2**20),
                f"peak_rss_mb_{large}": round(peaks[large] / 2**20),
                "rss_ratio_large_vs_small": round(peaks[large] / peaks[small], 2),
            }), flush=True)
    finally:
        store.stop()


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    main()
