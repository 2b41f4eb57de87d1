"""Clinical studies: the roi read plan against the one-read plan on the same archive (issue 16).

Writes clinical studies (`vfx-ray synth --clinical`: 512 x 512, 1.25 mm over T1-S1, localizer,
bone and soft kernels, reformats, dose report, secondary capture) into the embedded S3 store,
then runs `vfx-ray crops` as a fresh process with ``--read-plan whole`` (every object read
whole, once: the plan before issue 16) and ``--read-plan auto`` (here: roi) on the same archive.
Prints for each: wall seconds, patients/s, peak RSS of the process tree, bytes read against
the bytes of the objects the crops needed (from reads.parquet); that the crops are equal; and
the peak RSS of the auto plan at two archive sizes.

    .venv/bin/python benchmarks/clinical.py --patients 20 --small 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import cohorts_in_s3, local_folder, peak_rss_of

from vfx_ray.config import SynthConfig, clinical_synth

SYNTH_FIELDS = ("matrix", "pixel_spacing_mm", "slice_thickness_mm", "coverage", "fov_mask", "study",
                "overlap_fraction")


def run(uri: str, plan: str) -> dict[str, object]:
    out = tempfile.mkdtemp(prefix=f"bench-clinical-{plan}-")
    cmd = [sys.executable, "-m", "vfx_ray.cli", "crops", "--archive", f"{uri}/dicom", "--annotations",
           f"{uri}/annotations.csv", "--out", out, "--read-plan", plan, "--quiet"]
    t = time.perf_counter()
    peak = peak_rss_of(cmd)
    seconds = time.perf_counter() - t
    manifest = json.loads(Path(out, "manifest.json").read_text())
    return {"plan": plan, "out": out, "seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20),
            "patients": manifest["patients_with_crops"], "crops": manifest["crops"], "errors": manifest["errors"],
            **manifest["reads"]}


def same_crops(a: str, b: str) -> bool:
    ta, tb = (pq.read_table(f"{d}/crops.parquet").sort_by([("patient_id", "ascending"),
                                                          ("slice_index", "ascending")]) for d in (a, b))
    return ta.num_rows == tb.num_rows and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(ta["image"].to_pylist(), tb["image"].to_pylist(), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--small", type=int, default=5, help="the smaller archive of the RSS ratio (0: skip)")
    args = ap.parse_args()
    preset = clinical_synth()
    fields = {f: getattr(preset, f) for f in SYNTH_FIELDS}
    assert dataclasses.replace(SynthConfig(), **fields)  # every field still exists
    sizes = [args.patients] + ([args.small] if args.small else [])
    with cohorts_in_s3(sizes, preset.matrix, synth=fields) as cohorts:
        uri = cohorts[args.patients]
        listing = sum(p.stat().st_size for p in Path(local_folder(uri)).rglob("*") if p.is_file())
        print(json.dumps({"archive_mb": round(listing / 2**20)}), flush=True)
        rows = {plan: run(uri, plan) for plan in ("whole", "auto")}
        for r in rows.values():
            r["patients_per_s"] = round(r["patients"] / r["seconds"], 3)
            print(json.dumps({k: v for k, v in r.items() if k != "out"}), flush=True)
        print(json.dumps({"speedup_auto_vs_whole": round(rows["whole"]["seconds"] / rows["auto"]["seconds"], 2),
                          "crops_equal": same_crops(rows["whole"]["out"], rows["auto"]["out"])}), flush=True)
        if args.small:
            small = run(cohorts[args.small], "auto")
            print(json.dumps({f"peak_rss_mb_{args.small}": small["peak_rss_mb"],
                              f"peak_rss_mb_{args.patients}": rows["auto"]["peak_rss_mb"],
                              "rss_ratio": round(rows["auto"]["peak_rss_mb"] / small["peak_rss_mb"], 2)}), flush=True)


if __name__ == "__main__":
    main()
