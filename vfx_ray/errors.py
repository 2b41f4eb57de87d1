"""One exception type for everything a bad study can do; it becomes a row of the errors table."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the row's type only: errors stays free of pyarrow at run time
    from vfx_ray.contracts import ErrorRow


class VfxError(Exception):
    """A failure tied to one patient/series/object and a pipeline stage, meant for the user.

    ``stage`` is where it happened (list, header, index, annotations, decode, geometry, crop,
    score, ...); ``message`` says what is wrong and, where it helps, what to fix.
    """

    def __init__(
        self,
        stage: str,
        message: str,
        *,
        patient_id: str | None = None,
        series_instance_uid: str | None = None,
        object_key: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.patient_id = patient_id
        self.series_instance_uid = series_instance_uid
        self.object_key = object_key
        self.error_type = error_type or type(self).__name__

    def row(self) -> ErrorRow:
        return {
            "patient_id": self.patient_id,
            "series_instance_uid": self.series_instance_uid,
            "object_key": self.object_key,
            "stage": self.stage,
            "error_type": self.error_type,
            "message": self.message,
        }


def error_row(
    exc: BaseException,
    stage: str,
    *,
    patient_id: str | None = None,
    series_instance_uid: str | None = None,
    object_key: str | None = None,
) -> ErrorRow:
    """An errors-table row for any exception; VfxError fields win, context fills the gaps."""
    if isinstance(exc, VfxError):
        row = exc.row()
        row["patient_id"] = row["patient_id"] or patient_id
        row["series_instance_uid"] = row["series_instance_uid"] or series_instance_uid
        row["object_key"] = row["object_key"] or object_key
        return row
    return {
        "patient_id": patient_id,
        "series_instance_uid": series_instance_uid,
        "object_key": object_key,
        "stage": stage,
        "error_type": type(exc).__name__,
        "message": str(exc) or repr(exc),
    }
