"""Synthetic cohort throughput: patients per second, serial (1 worker) vs a process pool.

    .venv/bin/python benchmarks/synth.py --patients 16 --matrix 256 --workers 2

Both runs write the same cohort (same seed) to fresh temp folders in the same process, so
the ratio compares like with like; the pool's start-up (spawned interpreters) is included.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import replace

from vfx_ray.config import SynthConfig
from vfx_ray.synth.cohort import generate_cohort


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_run(cfg: SynthConfig, workers: int) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, files written, bytes written) for one cohort in a temp folder.

    CPU seconds do not depend on what else the machine runs; wall seconds do.
    """
    out = tempfile.mkdtemp(prefix="vfx-synth-bench-")
    try:
        start, cpu = time.perf_counter(), _cpu_seconds()
        frame = generate_cohort(out, cfg, workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
        return seconds, cpu, int(frame["n_files"].sum()), sum(os.path.getsize(f) for f in files)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--matrix", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="pool size of the parallel run")
    p.add_argument("--transfer-syntax", default="explicit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = replace(SynthConfig(), patients=args.patients, matrix=args.matrix, seed=args.seed,
                  transfer_syntax=args.transfer_syntax)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"1-min load average before: {os.getloadavg()[0]:.1f}")
    print(f"cohort: {args.patients} patients, matrix {args.matrix}, {args.transfer_syntax}")
    results = {}
    for label, workers in (("serial", 1), ("parallel", args.workers)):
        seconds, cpu, n_files, n_bytes = timed_run(cfg, workers)
        results[label] = args.patients / seconds
        print(f"{label:8s} workers={workers}: {seconds:6.1f} s  {results[label]:5.2f} patients/s  "
              f"{cpu / args.patients:4.2f} CPU s/patient  {n_files} files  {n_bytes / 1e6:.0f} MB  "
              f"(1-min load average after: {os.getloadavg()[0]:.1f})")
    print(f"ratio parallel/serial: {results['parallel'] / results['serial']:.2f}x")


if __name__ == "__main__":
    main()
