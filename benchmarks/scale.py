"""Archive scale: what the driver of `crops` and `score` holds as the archive grows (issue 27).

Each archive is one synthetic patient (matrix 64, 47 objects of about 12 KB) re-stamped with a
new patient id and new study, series, frame-of-reference and instance UIDs, once per patient,
written straight into the embedded S3 store's folder: 200,000 objects take minutes to write,
not the hours a full synthesis would. `vfx-ray crops` and `vfx-ray score` (fresh processes,
each with its local Ray cluster) run on each archive, and the RSS of the **driver process
alone** and of its **process tree** (driver, Ray's daemons and workers) is sampled every 0.2 s.

Prints one JSON line per (job, size), then per job the driver's bytes per added object, the
ratio of its peaks (largest / smallest) and the driver memory projected to 13 M objects (a
10,000-study clinical archive) from that slope; and the slope of its private memory plus the
object store pages it touched, which leaves out the mapped libraries' pages (they vary by a
hundred MB from run to run).

    .venv/bin/python benchmarks/scale.py --objects 20000,200000
    .venv/bin/python benchmarks/scale.py --objects 20000,200000 --patients 426   # more series, same patients
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import STORE_ROOT, local_folder, peak_rss

ARCHIVE_13M = 13_000_000  # objects of a 10,000-study clinical archive (about 1,300 a study)


def template(work: Path) -> tuple[list[bytes], dict[str, str]]:
    """The objects and annotation row of one synthetic patient (seeded: the same every run)."""
    import pandas as pd

    from vfx_ray.config import SynthConfig
    from vfx_ray.synth.cohort import generate_cohort

    generate_cohort(str(work / "template"), SynthConfig(patients=1, matrix=64, seed=1), workers=1, progress=False)
    files = sorted((work / "template" / "dicom").rglob("*.dcm"))
    row = pd.read_csv(work / "template" / "annotations.csv").iloc[0].to_dict()
    return [f.read_bytes() for f in files], row


def restamp(args: tuple[list[bytes], str, range, int]) -> list[tuple[str, str, str]]:
    """Write patients ``ids`` of an archive: the template with new ids and UIDs, ``series``
    series each (the first is the annotated one). Returns their (patient id, study uid, series uid)."""
    import pydicom
    from pydicom.uid import generate_uid

    objects, root, ids, series_each = args
    datasets = [pydicom.dcmread(io.BytesIO(b)) for b in objects]
    written = []
    for i in ids:
        pid, study = f"S{i:06d}", generate_uid()
        uids = [generate_uid() for _ in range(series_each)]
        for series in uids:
            frame = generate_uid()
            folder = Path(root) / pid / series
            folder.mkdir(parents=True)
            for ds in datasets:
                sop = generate_uid()
                ds.PatientID, ds.PatientName = pid, pid
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
                ds.save_as(folder / f"{sop}.dcm", enforce_file_format=True)
        written.append((pid, study, uids[0]))
    return written


def write_archive(objects: list[bytes], row: dict, uri: str, patients: int, series_each: int = 1) -> None:
    """``patients`` re-stamped copies (``series_each`` series each) under ``uri``/dicom and
    their annotations.csv (naming each patient's first series)."""
    import pandas as pd

    root = local_folder(f"{uri}/dicom")
    step = -(-patients // 16)
    work = [(objects, root, range(a, min(a + step, patients)), series_each) for a in range(0, patients, step)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        written = [w for part in pool.map(restamp, work) for w in part]
    rows = [{**row, "patient_id": pid, "study_instance_uid": study, "series_instance_uid": series,
             "label": "malignant" if i % 2 else "benign"} for i, (pid, study, series) in enumerate(written)]
    pd.DataFrame(rows).to_csv(local_folder(f"{uri}/annotations.csv"), index=False)


def run(job: str, uri: str, model: str, objects: int) -> dict:
    """One job as a fresh process on the archive at ``uri``: its wall time, outputs and peak RSS
    (driver alone, whole tree); printed as a JSON line."""
    from vfx_ray import storage

    cmd = [sys.executable, "-m", "vfx_ray.cli", job, "--archive", f"{uri}/dicom", "--annotations",
           f"{uri}/annotations.csv", "--out", f"{uri}/{job}", "--quiet"]
    if job == "score":
        cmd[-1:-1] = ["--model", model]
    t = time.perf_counter()
    peaks = peak_rss(cmd)
    seconds = time.perf_counter() - t
    result = {"job": job, "objects": objects, "seconds": round(seconds), "objects_per_s": round(objects / seconds),
              "rows": storage.read_table(f"{uri}/{job}/{'crops' if job == 'crops' else 'scores'}.parquet").num_rows,
              "errors": storage.read_table(f"{uri}/{job}/errors.parquet").num_rows,
              "driver_peak_mb": round(peaks.driver / 2**20), "tree_peak_mb": round(peaks.tree / 2**20),
              "driver_private_peak_mb": round(peaks.driver_private / 2**20),
              "driver_object_store_pages_peak_mb": round(peaks.driver_shared / 2**20)}
    print(json.dumps(result), flush=True)
    return result | {"driver": peaks.driver, "owned": peaks.driver_private + peaks.driver_shared}


def growth(job: str, small: dict, large: dict) -> None:
    """The driver's growth from the smallest to the largest archive, and its projection to 13 M objects."""
    slope = (large["driver"] - small["driver"]) / (large["objects"] - small["objects"])
    projected = large["driver"] + slope * (ARCHIVE_13M - large["objects"])
    # the peak RSS also counts mapped libraries' pages, which vary by a hundred MB between runs:
    # the slope of private memory + object store pages (each its own peak) is the steadier reading
    owned = (large["owned"] - small["owned"]) / (large["objects"] - small["objects"])
    print(json.dumps({"job": job, "driver_bytes_per_added_object": round(slope),
                      "driver_private_and_store_pages_bytes_per_added_object": round(owned),
                      "driver_peak_ratio_largest_vs_smallest": round(large["driver"] / small["driver"], 2),
                      "driver_gb_projected_13M_objects": round(projected / 2**30, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", default="20000,200000", help="archive sizes in objects, smallest first")
    ap.add_argument("--jobs", default="crops,score", help="which jobs to run on each archive")
    ap.add_argument("--patients", type=int, help="the same patients in every archive, the objects reached by "
                    "more series per patient (one annotated): growth per object with patients fixed")
    args = ap.parse_args()

    from vfx_ray.ml.model import build_model, save_model
    from vfx_ray.services import object_store

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    STORE_ROOT.append(work / "s3")
    try:
        (work / "s3" / "vfx").mkdir(parents=True)
        objects, row = template(work)
        sizes = {}  # objects -> (patients, series each)
        for n in sorted(int(s) for s in args.objects.split(",")):
            sizes[n] = (args.patients, -(-n // (args.patients * len(objects)))) if args.patients else (
                -(-n // len(objects)), 1)
        for n, (patients, series_each) in sizes.items():  # before the store starts: it caches listed folders
            t = time.perf_counter()
            write_archive(objects, row, f"s3://vfx/scale{n}", patients, series_each)
            print(f"archive {n} objects ({patients} patients x {series_each} series x {len(objects)}): "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        torch.manual_seed(0)
        model = str(work / "model.pt")
        save_model(build_model("resnet18", pretrained="none"), model, "resnet18")
        store = object_store.start(work / "s3", buckets=("vfx",))
        store.export()
        try:
            for job in args.jobs.split(","):
                runs = [run(job, f"s3://vfx/scale{n}", model, p * k * len(objects)) for n, (p, k) in sizes.items()]
                if len(runs) > 1:
                    growth(job, runs[0], runs[-1])
        finally:
            store.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the archives: 12 KB an object


if __name__ == "__main__":
    main()
