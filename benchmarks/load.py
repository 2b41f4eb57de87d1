"""Load: score a large synthetic archive end to end with flat memory.

Writes a small-matrix cohort of each size to the embedded S3 store, then runs
`vfx-ray score` (a fresh process: driver, local Ray cluster, workers) on each, sampling the
RSS of its whole process tree every 0.2 s. Prints peak RSS per size and the ratio large /
small (streaming: the ratio stays near 1 however large the archive), and patients/s.

    .venv/bin/python benchmarks/load.py --sizes 200,2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from common import cohorts_in_s3, peak_rss_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,2000", help="archive sizes, smallest first")
    ap.add_argument("--matrix", type=int, default=128, help="in-plane matrix of the synthetic CT")
    ap.add_argument("--arch", default="resnet18", help="model (random weights; speed does not depend on them)")
    args = ap.parse_args()

    from vfx_ray import storage
    from vfx_ray.ml.model import build_model, save_model

    sizes = sorted(int(s) for s in args.sizes.split(","))
    torch.manual_seed(0)
    model = f"{tempfile.mkdtemp(prefix='bench-load-')}/model.pt"
    save_model(build_model(args.arch, pretrained="none"), model, args.arch)
    results: dict[str, float] = {"matrix": args.matrix, "arch": args.arch}
    with cohorts_in_s3(sizes, args.matrix) as cohorts:
        for n in sizes:
            out = f"s3://vfx/load-scores-{n}"
            cmd = [sys.executable, "-m", "vfx_ray.cli", "score", "--archive", f"{cohorts[n]}/dicom",
                   "--annotations", f"{cohorts[n]}/annotations.csv", "--model", model, "--out", out, "--quiet"]
            t = time.perf_counter()
            peak = peak_rss_of(cmd)
            seconds = time.perf_counter() - t
            rows = storage.read_table(f"{out}/scores.parquet").num_rows
            errors = storage.read_table(f"{out}/errors.parquet").num_rows
            assert rows == n and errors == 0, (n, rows, errors)
            results[f"peak_rss_mb_{n}"] = round(peak / 2**20)
            results[f"patients_per_s_{n}"] = round(n / seconds, 2)
            print(
                json.dumps(
                    {
                        "patients": n,
                        "rows": rows,
                        "errors": errors,
                        "seconds": round(seconds),
                        "peak_rss_mb": round(peak / 2**20),
                    }
                ),
                flush=True,
            )
    results["rss_ratio_largest_vs_smallest"] = round(
        results[f"peak_rss_mb_{sizes[-1]}"] / results[f"peak_rss_mb_{sizes[0]}"], 2
    )
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
