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
import sys
import tempfile
import time

from common import cohorts_in_s3, peak_rss_of, plain_patients


def measure_memory(archive: str, annotations_uri: str) -> int:
    """Peak RSS of a fresh `vfx-ray crops` process tree (driver, raylet, workers)."""
    out = tempfile.mkdtemp(prefix="bench-crops-")
    return peak_rss_of(
        [
            sys.executable,
            "-m",
            "vfx_ray.cli",
            "crops",
            "--archive",
            archive,
            "--annotations",
            annotations_uri,
            "--out",
            out,
            "--quiet",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=50, help="archive size for the throughput comparison")
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--memory-sizes", default="50,200", help="archive sizes for peak RSS ('' to skip)")
    args = ap.parse_args()

    import ray

    from vfx_ray.crops import run_crops

    sizes = sorted({args.patients, *[int(s) for s in args.memory_sizes.split(",") if s]})
    with cohorts_in_s3(sizes, args.matrix) as cohorts:
        base = cohorts[args.patients]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_crops(
            f"{cohorts[sizes[0]]}/dicom", f"{cohorts[sizes[0]]}/annotations.csv", "s3://vfx/warmup", progress=False
        )
        t = time.perf_counter()
        summary = run_crops(f"{base}/dicom", f"{base}/annotations.csv", "s3://vfx/bench-out", progress=False)
        ray_s = time.perf_counter() - t
        ray.shutdown()
        t = time.perf_counter()
        n_loop = sum(len(crops) for _, crops in plain_patients(f"{base}/dicom", f"{base}/annotations.csv"))
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


if __name__ == "__main__":
    main()
