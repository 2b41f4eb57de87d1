"""Score's reports on the workers against the driver's serial loop (issue 27).

An archive of N patients (one synthetic patient re-stamped, as in ``scale.py``: matrix 64, 47
objects each) is scored with a 3-model ResNet50 ensemble (random weights: only time matters)
and ``--sr-out`` a folder with key images. When the scores are written, the same reports are
built and written twice in the same run: first by the driver one patient after another
(``patient_reports.work`` + ``delivery.push``, the path before issue 27: series read and
decoded again, Grad-CAM, figure, SC and SR), then by the job itself (``stages/outbox.py``:
a Ray Data actor pool, one actor per CPU). Prints both times, their ratio, the driver's RSS
before and after each path, and whether both wrote the same objects.

    .venv/bin/python benchmarks/reports.py --patients 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import STORE_ROOT
from scale import template, write_archive


def rss_mb() -> float:
    return [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")][0] / 1024


def written(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.dcm")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=200)
    args = ap.parse_args()

    from vfx_ray.config import CropConfig
    from vfx_ray.export import delivery, patient_reports
    from vfx_ray.ml.model import build_model, save_model
    from vfx_ray.runtime.session import ensure_ray
    from vfx_ray.stages import score

    work = Path(tempfile.mkdtemp(prefix="bench-reports-"))
    try:
        objects, row = template(work)
        STORE_ROOT.append(work)  # write_archive's "archive" is this folder's archive/
        write_archive(objects, row, "archive", args.patients)
        for k in range(3):
            torch.manual_seed(k)
            (work / "run" / f"fold_{k}").mkdir(parents=True)
            save_model(build_model("resnet50", pretrained="none"), str(work / "run" / f"fold_{k}" / "model.pt"),
                       "resnet50")
        ensure_ray()
        times: dict[str, float] = {}

        class Measured(score.ScoreJob):
            def send_reports(self, table):  # noqa: ANN001, ANN202 - the job's own step, timed against the old one
                tasks = self.plan.tasks
                key_image = patient_reports.key_image_maker(self.models.files, self.cfg)
                series = self.index.series_objects({t.series_instance_uid for t in tasks})
                before = rss_mb()
                t = time.perf_counter()
                old = delivery.push(str(work / "serial"), patient_reports.work(table, tasks, series, self.cfg,
                                                                                self.pseudo, key_image))
                times["driver_serial_s"] = time.perf_counter() - t
                times["serial_rss_mb"] = [round(before), round(rss_mb())]
                before = rss_mb()
                t = time.perf_counter()
                out = super().send_reports(table)
                times["workers_s"] = time.perf_counter() - t
                times["workers_rss_mb"] = [round(before), round(rss_mb())]
                times["errors"] = [len(old.errors), len(out.errors)]
                return out

        options = score.ScoreOptions(sr_out=str(work / "workers"), key_images=True, progress=False)
        job = Measured(str(work / "archive" / "dicom"), str(work / "out"), CropConfig(), options,
                       score.Models.load(str(work / "run")))
        summary = job.run(str(work / "archive" / "annotations.csv"))
        same = written(work / "serial") == written(work / "workers")
        print(json.dumps({"patients": args.patients, "scored": summary["rows"], "cpus": os.cpu_count(), **{
            k: round(v, 1) if isinstance(v, float) else v for k, v in times.items()},
            "speedup": round(times["driver_serial_s"] / times["workers_s"], 2), "same_objects": same,
            "objects": len(written(work / "workers"))}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
