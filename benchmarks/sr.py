"""What sending reports costs per patient (issue 18), against writing the same SRs to a folder.

Builds N Structured Reports (highdicom; a 150-instance source series, 12 slice probabilities),
then in the same run: writes them to a local folder (the baseline), sends them to the
embedded Orthanc by STOW-RS (a QIDO-RS check first, as ``score --sr-out`` does), and sends
them again (QIDO-RS only: the re-run of an idempotent job). No Ray: the reports are sent by
the job's driver, one patient after another.

    .venv/bin/python benchmarks/sr.py --patients 100
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pydicom import Dataset

CT = "1.2.840.10008.5.1.4.1.1.2"


def reports(n: int, instances: int = 150) -> list[Dataset]:
    from vfx_ray.export import sr

    out = []
    for i in range(n):
        study = Dataset()
        study.PatientID, study.PatientName = f"BENCH{i:04d}", f"Bench^{i}"
        study.StudyInstanceUID = sr.fixed_uid("bench-study", str(i))
        series = sr.fixed_uid("bench-series", str(i))
        source = sr.SourceSeries(study, series, [(CT, sr.fixed_uid("bench", str(i), str(k))) for k in range(instances)],
                                 sr.fixed_uid("bench-for", str(i)))
        row = {"patient_id": study.PatientID, "probability": 0.7, "threshold": 0.5, "n_models": 10,
               "slice_indices": list(range(12)), "slice_probabilities": [k / 12 for k in range(12)],
               "model_id": "bench", "vertebra": "L1"}
        out.append(sr.structured_report(row, source, (0, 30, 0, 30, 0, 30), malignant=True))
    return out


def timed(label: str, n: int, step, baseline: float | None = None) -> float:
    t = time.perf_counter()
    out = step()
    seconds = time.perf_counter() - t
    ratio = f"  {seconds / baseline:.2f}x the folder" if baseline else ""
    print(f"{label:42s} {seconds:6.2f} s  {1000 * seconds / n:6.1f} ms/patient{ratio}  {out or ''}", flush=True)
    return seconds


def main() -> None:
    from vfx_ray.export import delivery
    from vfx_ray.services import orthanc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100)
    n = parser.parse_args().patients
    built: list[Dataset] = []
    timed("build SRs (highdicom)", n, lambda: built.extend(reports(n)))
    work = Path(tempfile.mkdtemp(prefix="bench-sr-"))
    server = orthanc.start(work / "pacs", log_file=work / "orthanc.log")
    server.export()
    try:
        work_items = [(ds.PatientID, "s", (lambda d=ds: [d])) for ds in built]
        folder = timed("folder (baseline)", n, lambda: delivery.push(str(work / "folder"), work_items).summary())
        timed("Orthanc, STOW-RS (QIDO-RS first)", n, lambda: delivery.push(server.dicomweb_uri, work_items).summary(),
              folder)
        timed("Orthanc again (QIDO-RS only)", n, lambda: delivery.push(server.dicomweb_uri, work_items).summary(),
              folder)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
