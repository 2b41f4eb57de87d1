"""The ROI box of an annotation: the one type that holds and validates it, for every stage.

Six ``roi_*_mm`` columns (DESIGN.md) in DICOM patient coordinates (LPS, mm); x picks the
sagittal slices, (y, z) the crop. A bad box is a VfxError of stage ``annotations`` and type
``BadROI``, naming the column and the fix, raised when the annotations are planned (before
any DICOM is read) and again by anything that builds a box from a record. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vfx_ray.errors import VfxError

ROI_COLUMNS = ("roi_x_min_mm", "roi_x_max_mm", "roi_y_min_mm", "roi_y_max_mm", "roi_z_min_mm", "roi_z_max_mm")
BAD_ROI = "BadROI"


@dataclass(frozen=True)
class RoiBox:
    """Axis-aligned box around the abnormal area, LPS mm; x picks slices, (y, z) the crop."""

    x_min: float
    x_max: float
    y_min: float
    y_max: float
    z_min: float
    z_max: float
    patient_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        values = np.array(self.bounds, dtype=float)
        bad = [c for c, v in zip(ROI_COLUMNS, values, strict=True) if not np.isfinite(v)]
        if bad:
            self._fail(f"ROI box has missing or non-finite values in {', '.join(bad)}; fill all six roi_*_mm columns")
        for axis, lo, hi in zip("xyz", values[::2], values[1::2], strict=True):
            if lo > hi:
                self._fail(f"ROI box roi_{axis}_min_mm={lo} > roi_{axis}_max_mm={hi}; swap them")
        if max(values[3] - values[2], values[5] - values[4]) <= 0:
            self._fail(f"ROI box {self._text()} has no extent in y or z; draw the box around the abnormal area")

    @classmethod
    def parse(cls, values: Sequence[Any], patient_id: str | None = None) -> RoiBox:
        """From the six column values as read (None -> NaN; text that is not a number: BadROI)."""
        try:
            bounds = [math.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise VfxError("annotations", f"ROI box values are not numbers: {list(values)}", patient_id=patient_id,
                           error_type=BAD_ROI) from None
        return cls(*bounds, patient_id=patient_id)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], patient_id: str | None = None) -> RoiBox:
        """From an annotations row with the ``roi_*_mm`` columns (None/missing -> NaN)."""
        pid = patient_id if patient_id is not None else record.get("patient_id")
        return cls.parse([record.get(c) for c in ROI_COLUMNS], pid)

    @property
    def bounds(self) -> tuple[float, float, float, float, float, float]:
        return (self.x_min, self.x_max, self.y_min, self.y_max, self.z_min, self.z_max)

    @property
    def centre(self) -> np.ndarray:
        return np.array(self.bounds, dtype=float).reshape(3, 2).mean(axis=1)

    def square(self) -> tuple[float, float, float, float]:
        """Smallest square (y_min, y_max, z_min, z_max) holding the (y, z) extent, same centre."""
        half = max(self.y_max - self.y_min, self.z_max - self.z_min) / 2
        _, cy, cz = self.centre
        return (cy - half, cy + half, cz - half, cz + half)

    def _fail(self, message: str) -> None:
        raise VfxError("annotations", message, patient_id=self.patient_id, error_type=BAD_ROI)

    def _text(self) -> str:
        return "(" + ", ".join(f"{v:g}" for v in self.bounds) + ")"
