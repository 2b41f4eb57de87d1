"""Where a score run's Structured Reports (and key images) go, and how they get there.

``--sr-out`` is a folder or S3 prefix (``<uri>/<patient>/<SOP Instance UID>.dcm``) or a PACS
(``dicomweb+http(s)://host/root``, STOW-RS). Idempotent: every object's SOP Instance UID is
fixed by patient, series and model id (:func:`vfx_ray.export.sr.report_uid`) and the target is
asked first (the file exists / QIDO-RS finds the instance), so a re-run sends nothing twice;
Orthanc would also keep the first copy of a re-sent UID (``OverwriteInstances: false``).
A PACS that is down or refuses gives error rows naming the patient, after retries with
backoff; after a few patients in a row found it unreachable, the rest are not tried (each
gets its row). Scores are written before any report is sent, so they never wait on the PACS.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from pydicom import Dataset

from vfx_ray import dicomweb, storage

RETRIES = 4  # attempts per object on a connection error or a 5xx/429 answer
BACKOFF_S = 0.5  # doubled after each failed attempt
GIVE_UP_AFTER = 3  # patients in a row that found the PACS unreachable: the rest are not tried
STAGE = "sr"


class Unreachable(Exception):
    """The target did not answer (connection refused, timeout, 5xx) after the retries."""


class Refused(Exception):
    """The target answered and refused the object (4xx, or a STOW-RS failure item)."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


class FolderSink:
    """One ``.dcm`` per object under ``<uri>/<patient>/``, named by its SOP Instance UID."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def path(self, ds: Dataset) -> str:
        return storage.join(self.uri, _safe(str(ds.PatientID)), f"{ds.SOPInstanceUID}.dcm")

    def has(self, ds: Dataset) -> bool:
        return storage.exists(self.path(ds))

    def put(self, ds: Dataset) -> None:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        storage.write_bytes(self.path(ds), buf.getvalue())


class DicomwebSink:
    """A PACS over DICOMweb: QIDO-RS to ask, STOW-RS to send."""

    def __init__(self, uri: str) -> None:
        self.uri, self.where = uri, dicomweb.service_url(uri)

    def _call(self, request: Callable[[], Any]) -> Any:
        import requests

        try:
            return request()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is not None and status < 500 and status != 429:
                raise Refused(f"the PACS at {self.where} refused it: HTTP {status}") from None
            raise Unreachable(f"the PACS at {self.where} answered HTTP {status}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Unreachable(f"the PACS at {self.where} did not answer ({type(exc).__name__})") from None

    def has(self, ds: Dataset) -> bool:
        found = self._call(lambda: dicomweb.client(self.uri).search_for_instances(
            study_instance_uid=str(ds.StudyInstanceUID), search_filters={"SOPInstanceUID": str(ds.SOPInstanceUID)}))
        return bool(found)

    def put(self, ds: Dataset) -> None:
        answer = self._call(lambda: dicomweb.client(self.uri).store_instances([ds]))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reason = failed[0].get("FailureReason")
            raise Refused(f"the PACS at {self.where} refused it (STOW-RS failure reason {reason})")


def sink_for(uri: str) -> FolderSink | DicomwebSink:
    return DicomwebSink(uri) if dicomweb.is_dicomweb(uri) else FolderSink(uri)


def target_name(uri: str) -> str:
    """The target as said in messages: a PACS's service URL, else the URI."""
    return dicomweb.service_url(uri) if dicomweb.is_dicomweb(uri) else uri


def with_retries(step: Callable[[], Any], backoff_s: float | None = None) -> Any:
    """``step()`` again after an :class:`Unreachable`, waiting longer each time (RETRIES
    attempts, ``backoff_s`` (default BACKOFF_S) then doubling: 3.5 s in all)."""
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(RETRIES):
        try:
            return step()
        except Unreachable:
            if attempt == RETRIES - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def send(sink: FolderSink | DicomwebSink, datasets: Iterable[Dataset], backoff_s: float | None = None
         ) -> tuple[int, int]:
    """Each object unless the target has it: (sent, already there)."""
    sent = there = 0
    for ds in datasets:
        if with_retries(lambda d=ds: sink.has(d), backoff_s):
            there += 1
        else:
            with_retries(lambda d=ds: sink.put(d), backoff_s)
            sent += 1
    return sent, there


@dataclasses.dataclass
class Outcome:
    """What a run sent: counts for the summary, error rows for the errors table."""

    sent: int = 0
    already_there: int = 0
    patients: int = 0
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, other: Outcome) -> None:
        self.sent, self.already_there = self.sent + other.sent, self.already_there + other.already_there
        self.patients += other.patients
        self.errors += other.errors

    def summary(self) -> dict[str, int]:
        return {"sr_objects_sent": self.sent, "sr_objects_already_there": self.already_there,
                "sr_patients": self.patients, "sr_errors": len(self.errors)}


def error(patient_id: str | None, series_uid: str | None, error_type: str, message: str) -> dict[str, Any]:
    return {"patient_id": patient_id, "series_instance_uid": series_uid, "object_key": None, "stage": STAGE,
            "error_type": error_type, "message": message}


class Sender:
    """Builds and sends patients' objects to one target, one patient at a time, and stops
    trying after ``GIVE_UP_AFTER`` patients in a row found it unreachable (each later patient
    gets its error row at once). One per process: a Ray worker keeps its own."""

    def __init__(self, uri: str, backoff_s: float | None = None) -> None:
        self.uri, self.sink, self.unreachable, self.backoff_s = uri, sink_for(uri), 0, backoff_s

    def patient(self, pid: str | None, series: str | None, build: Callable[[], list[Dataset]], out: Outcome) -> None:
        """Add one patient's counts, or its error row, to ``out``; never raises."""
        if self.unreachable >= GIVE_UP_AFTER:
            out.errors.append(error(pid, series, "PacsUnreachable", f"not sent: {target_name(self.uri)} did not "
                                    f"answer for the last {GIVE_UP_AFTER} patients; re-run score to send the rest"))
            return
        try:
            sent, there = send(self.sink, build(), self.backoff_s)
            out.sent, out.already_there, out.patients, self.unreachable = (
                out.sent + sent, out.already_there + there, out.patients + 1, 0)
        except Unreachable as exc:
            self.unreachable += 1
            out.errors.append(error(pid, series, "PacsUnreachable", f"{exc} after {RETRIES} attempts; "
                                    "the scores are written: re-run score to send the report"))
        except Refused as exc:
            out.errors.append(error(pid, series, "PacsRefused", str(exc)))
        except Exception as exc:  # noqa: BLE001 - one patient's report never stops the others
            out.errors.append(error(pid, series, type(exc).__name__, f"no report: {exc}"))


def push(uri: str, work: Iterable[tuple[str, str, Callable[[], list[Dataset]]]],
         on_patient: Callable[[], None] = lambda: None) -> Outcome:
    """Build and send each patient's objects (``(patient, series, build)``) in this process;
    never raises for one patient."""
    sender, out = Sender(uri), Outcome()
    for pid, series, build in work:
        sender.patient(pid, series, build, out)
        on_patient()
    return out
