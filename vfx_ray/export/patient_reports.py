"""The score job's reports: for each scored patient, its SR (and key image) built from the
``scores.parquet`` row, the planned series and one header read of that series, then sent by
:mod:`delivery`. Runs on the workers after the scores are written (``stages/outbox.py``; one
ranged read per patient; ``--key-images`` reads and decodes the series once more to draw its
slice); :func:`work` runs it in the calling process.

With ``--pseudonymize`` every identifier in the objects is the run's pseudonym (patient id
and name, Study/Series/SOP Instance and Frame of Reference UIDs) and the birth date,
accession number, study id, dates and referring physician are left empty: such reports
belong in a research PACS, which is where their pseudonymised study lives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from pydicom import Dataset

from vfx_ray import storage
from vfx_ray.config import CropConfig
from vfx_ray.contracts import KEY_CAM, key_slice
from vfx_ray.export import sr
from vfx_ray.imaging import dicom
from vfx_ray.imaging.annotations import PatientTask
from vfx_ray.imaging.dicom import Volume
from vfx_ray.imaging.guards import parse
from vfx_ray.imaging.pseudonym import Pseudonymizer
from vfx_ray.imaging.roi import RoiBox

BLANKED = ("PatientBirthDate", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def study_header(task: PatientTask, cfg: CropConfig) -> Dataset:
    """The patient and study attributes from the series' first object's header."""
    key = task.object_keys[0]
    ds, _, _ = parse(storage.read_prefix(key, dicom.HEADER_PREFIX_BYTES), key, "sr", cfg.max_file_bytes,
                     object_size=None)
    return ds


def source_series(task: PatientTask, instances: list[list[str]], header: Dataset,
                  pseudo: Pseudonymizer | None) -> sr.SourceSeries:
    """What the report refers to (``instances``: the series' SOP class and instance UIDs),
    with identifiers as the run writes them."""
    study = Dataset()
    for kw in sr.STUDY_KEYWORDS:
        setattr(study, kw, header.get(kw, ""))
    refs = [(c, u) for c, u in instances]
    series, frame = task.series_instance_uid, str(header.get("FrameOfReferenceUID", "")) or None
    if pseudo:
        pid = pseudo.patient(task.patient_id)
        study.PatientID, study.PatientName = pid, f"{pid}^"  # the pseudonym as the family name
        study.StudyInstanceUID = pseudo.uid(str(study.StudyInstanceUID))
        for kw in BLANKED:
            setattr(study, kw, "")
        series, frame = pseudo.uid(series), pseudo.uid(frame)
        refs = [(c, pseudo.uid(u)) for c, u in refs]
    return sr.SourceSeries(study, series, refs, frame)


Build = Callable[[], list[Dataset]]
KeyImage = Callable[[PatientTask, dict, sr.SourceSeries, list[int] | None], Dataset]
Decode = Callable[[list[str], list[int], RoiBox, CropConfig], Volume]  # keys, sizes, box -> the box's slices


@dataclasses.dataclass
class Report:
    """One scored row's report to build: ``task`` (with its object keys) and ``instances``
    (its series' SOP class and instance UIDs); no task: the row no longer matches the plan.
    ``patient_id`` and ``series_instance_uid`` are as error rows name them."""

    patient_id: str | None
    series_instance_uid: str | None
    row: dict[str, Any]
    task: PatientTask | None = None
    instances: list[list[str]] | None = None
    sizes: list[int] | None = None  # the series' objects' sizes, in key order


def reports(table: pa.Table, tasks: list[PatientTask], series: Iterable[dict[str, Any]],
            pseudo: Pseudonymizer | None) -> Iterator[Report]:
    """A :class:`Report` per scored row. ``series``: the planned series with their objects
    (``index.ArchiveIndex.series_objects``), streamed in the archive's order: the reports come
    in that order, and only the scored rows are held, not every series' objects."""
    shown = pseudo.patient if pseudo else (lambda pid: pid)
    by_shown = {shown(t.patient_id): t for t in tasks}
    waiting: dict[str, tuple[PatientTask, dict]] = {}  # series uid -> its task and scored row
    for row in table.to_pylist():
        task = by_shown.get(row["patient_id"])
        if task is None:  # the message names it; a pseudonymised run does not know its real id
            yield Report(*((None, None) if pseudo else (row["patient_id"], row["series_instance_uid"])), row)
        else:
            waiting[task.series_instance_uid] = (task, row)
    for s in series:
        if s["series_instance_uid"] in waiting:
            task, row = waiting.pop(s["series_instance_uid"])
            task = dataclasses.replace(task, object_keys=s["object_keys"])
            yield Report(task.patient_id, task.series_instance_uid, row, task, s["sops"], s["object_sizes"])
    for task, row in waiting.values():  # scored, but its series is no longer in the archive
        yield Report(task.patient_id, task.series_instance_uid, row)


def build(report: Report, cfg: CropConfig, pseudo: Pseudonymizer | None, key_image: KeyImage | None
          ) -> list[Dataset]:
    """[key image, SR] of one report; a LookupError for a row without its task or series."""
    task, row = report.task, report.row
    if task is None or report.instances is None:
        raise LookupError(f"patient {row['patient_id']} has scores but is no longer in the annotations or the archive")
    source = source_series(task, report.instances, study_header(task, cfg), pseudo)
    key_images = [key_image(task, row, source, report.sizes)] if key_image else []
    malignant = row["probability"] >= row["threshold"]  # how patient_row chose the prediction
    return [*key_images, sr.structured_report(row, source, task.roi, malignant, key_images)]


def work(table: pa.Table, tasks: list[PatientTask], series: Iterable[dict[str, Any]], cfg: CropConfig,
         pseudo: Pseudonymizer | None, key_image: KeyImage | None) -> Iterator[tuple[str | None, str | None, Build]]:
    """(patient, series, build) per scored row, for :func:`delivery.push` in this process;
    ``build`` makes [key image, SR] when asked."""
    for r in reports(table, tasks, series, pseudo):
        yield r.patient_id, r.series_instance_uid, functools.partial(build, r, cfg, pseudo, key_image)


def key_image_maker(model_files: list[str], cfg: CropConfig, decode: Decode | None = None) -> KeyImage:
    """A function that draws a patient's key image: the slice of the highest probability, the
    models' mean Grad-CAM: the scorer's maps where the row has them (``KEY_CAM``), else the
    models run again (loaded once, on first use). ``decode`` reads only the slices of the
    ROI's context box (``pipeline.tasks.decode_box``, given where sizes are known); without it,
    or without sizes, the whole series is read and decoded once more."""
    from vfx_ray.export import key_image as drawing
    from vfx_ray.ml.model import load_model

    loaded: list[Any] = []

    def make(task: PatientTask, row: dict, source: sr.SourceSeries, sizes: list[int] | None = None) -> Dataset:
        cams = key_cams(row)
        if cams is None and not loaded:
            loaded.extend(load_model(f)[0] for f in model_files)
        roi = RoiBox(*task.roi, patient_id=task.patient_id)
        if decode is not None and sizes is not None:
            volume = decode(task.object_keys, sizes, drawing.context_roi(roi), cfg)
        else:
            volume = whole_series(task.object_keys, cfg)
        top = row["slice_indices"][key_slice(row)]
        rgb = drawing.render(volume, roi, top, cfg, loaded, row["probability"], row["threshold"], cams=cams)
        return drawing.secondary_capture(rgb, source, row["patient_id"], row["model_id"])

    return make


def key_cams(row: dict[str, Any]) -> np.ndarray | None:
    """(models, h, w) float32 class activation maps of a row's top slice, or None (a row
    scored without key images, or by a run before they were kept)."""
    packed = row.get(KEY_CAM)
    if not packed:
        return None
    maps = np.frombuffer(packed, np.float32)
    side = math.isqrt(len(maps) // row["n_models"])
    return maps.reshape(row["n_models"], side, side)


def whole_series(keys: list[str], cfg: CropConfig) -> Volume:
    """Every object of a series read and decoded."""
    data = storage.read_many(keys)
    bad = next((d for d in data if isinstance(d, BaseException)), None)
    if bad is not None:
        raise bad
    return dicom.load_volume(list(zip(keys, data, strict=True)), cfg)
