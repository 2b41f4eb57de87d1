"""`vfx-ray crops` against the serial tool a user would write, both timed as whole processes.

The baseline is benchmarks/sitk_loop.py: SimpleITK's series reader and sitk.Resample, one
process, on a local folder of the same synthetic cohort. `vfx-ray crops` runs as a fresh
process (start-up, Ray's local cluster and shutdown included) on the same local folder and on
the embedded S3 store. A second baseline, the project's own pydicom path run serially in this
process (the loop the earlier rows of docs/benchmarks.md compared against), is kept as a row.
Then the peak RSS of the whole `vfx-ray crops` process tree at two archive sizes.
Each figure is the median of ``--repeat`` runs; every run's crops count must agree.

    .venv/bin/python benchmarks/ingest.py --sizes 60,200 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cohorts_in_s3, local_folder, peak_rss_of, plain_patients

HERE = Path(__file__).parent


def crops_cmd(archive: str, annotations: str) -> list[str]:
    out = tempfile.mkdtemp(prefix="bench-crops-")
    return [sys.executable, "-m", "vfx_ray.cli", "crops", "--archive", archive, "--annotations", annotations,
            "--out", out, "--quiet"]


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, done.stdout


def crops_count(stdout: str) -> int:
    return int(stdout.split()[0])  # "N crops of ..."


def median_run(cmd: list[str], repeat: int, count) -> tuple[float, int]:
    runs = [timed(cmd) for _ in range(repeat)]
    counts = {count(out) for _, out in runs}
    assert len(counts) == 1, counts
    return statistics.median(s for s, _ in runs), counts.pop()


def measure(uri: str, n: int, repeat: int) -> dict[str, float]:
    """Seconds (median) of each way for one cohort, and the ratios against the SimpleITK loop."""
    local = local_folder(uri)
    loop_s, loop_crops = median_run([sys.executable, str(HERE / "sitk_loop.py"), f"{local}/dicom",
                                     f"{local}/annotations.csv"], repeat, lambda out: json.loads(out)["crops"])
    local_s, local_crops = median_run(crops_cmd(f"{local}/dicom", f"{local}/annotations.csv"), repeat, crops_count)
    s3_s, s3_crops = median_run(crops_cmd(f"{uri}/dicom", f"{uri}/annotations.csv"), repeat, crops_count)
    t = time.perf_counter()
    plain_crops = sum(len(c) for _, c in plain_patients(f"{local}/dicom", f"{local}/annotations.csv"))
    plain_s = time.perf_counter() - t
    assert loop_crops == local_crops == s3_crops == plain_crops, (loop_crops, local_crops, s3_crops, plain_crops)
    return {"patients": n, "crops": loop_crops, "sitk_loop_s": round(loop_s, 1),
            "pydicom_loop_in_process_s": round(plain_s, 1), "vfx_crops_local_s": round(local_s, 1),
            "vfx_crops_s3_s": round(s3_s, 1), "speedup_local_vs_sitk_loop": round(loop_s / local_s, 2),
            "speedup_s3_vs_sitk_loop": round(loop_s / s3_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="60,200", help="cohort sizes (patients)")
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is printed)")
    ap.add_argument("--memory-sizes", default="60,200", help="two sizes for the peak RSS ratio ('' to skip)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    memory = [int(s) for s in args.memory_sizes.split(",") if s]
    with cohorts_in_s3(sorted({*sizes, *memory}), args.matrix) as cohorts:
        for n in sizes:
            print(json.dumps(measure(cohorts[n], n, args.repeat)), flush=True)
        if len(memory) == 2:
            peaks = {n: peak_rss_of(crops_cmd(f"{cohorts[n]}/dicom", f"{cohorts[n]}/annotations.csv"))
                     for n in memory}
            print(json.dumps({**{f"peak_rss_mb_{n}": round(p / 2**20) for n, p in peaks.items()},
                              "rss_ratio": round(peaks[memory[1]] / peaks[memory[0]], 2)}), flush=True)


if __name__ == "__main__":
    main()
