"""A key image per scored patient: the decisive sagittal slice as a DICOM Secondary Capture.

Pure: a volume, its ROI box, the slice with the highest probability and the model(s) in, an RGB
picture (:func:`render`) and the DICOM dataset that carries it (:func:`secondary_capture`) out.
The picture shows the slice's 3 mm sagittal slab in a bone window (W 1500 / L 300 HU) with
context around the ROI (:func:`context_roi`), the models' mean Grad-CAM over the crop square
the classifier saw, the ROI box, and burned-in text: the probability and decision, the slice,
and that it is research output, not for diagnostic use.

Why a Secondary Capture and not a Grayscale Softcopy Presentation State: a GSPS can only draw
graphics on its referenced source images, which here are axial (the sagittal reformat the
model reads never exists as DICOM), and it cannot carry a heatmap; every viewer and PACS shows
an SC. Its UIDs come from :func:`vfx_ray.export.sr.report_uid`, so a re-sent key image is the same
instance, and the SR can reference it.

Orientation: rows run head to feet (row 0 = highest z), columns anterior to posterior (y
increasing), as :func:`vfx_ray.imaging.geometry.crop_samples` lays crops out; PatientOrientation P\\F.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DT
from torch import nn

from vfx_ray.config import CropConfig
from vfx_ray.export import sr
from vfx_ray.imaging.dicom import Volume
from vfx_ray.imaging.geometry import crop_samples, select_slices, slice_x
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.ml.gradcam import gradcam, heat_from_cams
from vfx_ray.ml.model import load_model

BONE_WINDOW = (1500.0, 300.0)  # width, level (HU): cortex and trabecular bone both readable
CONTEXT_MM = (30.0, 80.0)  # margin around the crop square on each side: its side, clipped to this
MAX_CONTEXT_PIXELS = 1024  # the context is sampled at the reformat spacing, up to this many pixels a side
HEAT_ALPHA = 0.5  # opacity of the hottest heatmap pixel; cold pixels stay clear
HEAT_CMAP = "inferno"  # no green in it, so the ROI's lime outline stays unambiguous
ROI_COLOUR = "#00ff00"
TOP_BAND, BOTTOM_BAND = 0.11, 0.08  # fractions of the picture's height kept for the text
KEY_IMAGE_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "vfx_ray key image - not for diagnostic use"
NOT_FOR_DIAGNOSIS = "RESEARCH - NOT FOR DIAGNOSTIC USE"
PATIENT_ORIENTATION = ("P", "F")  # along a row (columns increase): posterior; down a column: feet


def context_roi(roi: RoiBox) -> RoiBox:
    """The ROI's crop square widened in y and z by its side on each side (30-80 mm), same x.

    The caller that decodes only the slices an ROI needs (``geometry.slices_needed``) must
    ask for this box's slices too, since the context reaches further in z.
    """
    y0, y1, z0, z1 = roi.square()
    margin = float(np.clip(y1 - y0, *CONTEXT_MM))
    return RoiBox(roi.x_min, roi.x_max, float(y0 - margin), float(y1 + margin), float(z0 - margin),
                  float(z1 + margin), patient_id=roi.patient_id)


def image_rect(size: int = 512) -> tuple[int, int, int]:
    """(top row, left column, side) in pixels of the square where the slab is drawn."""
    top, bottom = round(TOP_BAND * size), round(BOTTOM_BAND * size)
    side = size - top - bottom
    return top, (size - side) // 2, side


def _row(volume: Volume, roi: RoiBox, slice_index: int, cfg: CropConfig, normalize: bool = True) -> dict[str, Any]:
    """The crop row of the slice the caller chose (the one with the highest probability),
    sampled alone: the ROI's other slices are not drawn."""
    rows = crop_samples(volume, roi, cfg, normalize=normalize, only=slice_index)
    if not rows:
        raise ValueError(f"slice {slice_index} is not one of the ROI's slices {select_slices(roi, cfg).tolist()}")
    return rows[0]


def _models(models: Sequence[nn.Module | str]) -> list[nn.Module]:
    """Loaded modules as they are; ``model.pt`` URIs loaded (a caller scoring many patients
    should load once and pass the modules)."""
    out = [m if isinstance(m, nn.Module) else load_model(m)[0] for m in models]
    if not out:
        raise ValueError("render needs at least one model for the Grad-CAM")
    return out


def heatmap(models: Sequence[nn.Module], crop: np.ndarray) -> np.ndarray:
    """(S, S) mean Grad-CAM of the models on one z-scored (C, S, S) crop: the ensemble's evidence."""
    return np.mean([gradcam(m, crop[None])[0] for m in models], axis=0).astype(np.float32)


def context_slab(volume: Volume, roi: RoiBox, slice_index: int, cfg: CropConfig) -> tuple[np.ndarray, RoiBox]:
    """The slice's slab (HU, rows head to feet, columns anterior to posterior) on the context box."""
    wide = context_roi(roi)
    side = wide.y_max - wide.y_min
    size = min(max(3 * cfg.crop_size, math.ceil(side / cfg.inplane_spacing_mm)), MAX_CONTEXT_PIXELS)
    row = _row(volume, wide, slice_index, dataclasses.replace(cfg, crop_size=size, channels=1), normalize=False)
    return row["image"][0], wide


def _draw(fig: Figure, slab: np.ndarray, wide: RoiBox, heat: np.ndarray, square: Sequence[float],
          roi: RoiBox) -> None:
    """The slab, the heatmap on the crop square and the ROI outline, in mm (y right, z up)."""
    size = fig.canvas.get_width_height()[1]
    top, left, side = image_rect(size)
    ax = fig.add_axes((left / size, 1 - (top + side) / size, side / size, side / size))
    ax.set_axis_off()
    width, level = BONE_WINDOW
    ax.imshow(slab, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, interpolation="bilinear",
              extent=(wide.y_min, wide.y_max, wide.z_min, wide.z_max), origin="upper")
    colours = colormaps[HEAT_CMAP](heat)
    colours[..., 3] = HEAT_ALPHA * heat
    y0, y1, z0, z1 = square
    ax.imshow(colours, interpolation="bilinear", extent=(y0, y1, z0, z1), origin="upper")
    ax.add_patch(Rectangle((roi.y_min, roi.z_min), roi.y_max - roi.y_min, roi.z_max - roi.z_min, fill=False,
                           edgecolor=ROI_COLOUR, linewidth=2 * size / 512, antialiased=False))
    ax.set_xlim(wide.y_min, wide.y_max)
    ax.set_ylim(wide.z_min, wide.z_max)


def caption(probability: float, threshold: float, slice_index: int, x_mm: float, thickness_mm: float,
            n_models: int) -> tuple[str, str]:
    """The two lines above the picture: the decision as scored (``p >= threshold``), then where."""
    decision = "malignant" if probability >= threshold else "benign"
    models = f"{n_models} models" if n_models > 1 else "1 model"
    return (f"p(malignant) = {probability:.2f}  threshold {threshold:.2f} -> {decision}",
            f"slice {slice_index}  (x = {x_mm:.1f} mm, {thickness_mm:g} mm slab)  Grad-CAM of {models}")


def _text(fig: Figure, lines: Sequence[str]) -> None:
    """Burned-in text in the bands above and below the picture, and the A/P sides beside it."""
    size = fig.canvas.get_width_height()[1]
    top, left, side = image_rect(size)
    points = 11 * size / 512
    for n, line in enumerate(lines):
        fig.text(0.02, 1 - (0.3 + n) * top / len(lines) / size - 0.01, line, color="white", fontsize=points,
                 va="top", family="DejaVu Sans")
    fig.text(0.5, BOTTOM_BAND / 2, NOT_FOR_DIAGNOSIS, color="#ffcc00", fontsize=points * 1.2, weight="bold",
             ha="center", va="center")
    middle = 1 - (top + side / 2) / size
    fig.text(left / 2 / size, middle, "A", color="white", fontsize=points, ha="center", va="center")
    fig.text(1 - left / 2 / size, middle, "P", color="white", fontsize=points, ha="center", va="center")


def render(volume: Volume, roi: RoiBox, slice_index: int, cfg: CropConfig | None,
           models: Sequence[nn.Module | str], probability: float, threshold: float = 0.5,
           size: int = 512, cams: np.ndarray | None = None) -> np.ndarray:
    """(size, size, 3) uint8 RGB key image of one sagittal slice of the ROI.

    ``models``: loaded modules (the fold ensemble, loaded once by the caller) or ``model.pt``
    URIs; their Grad-CAMs on the ROI's own crop of the slice are averaged. Or ``cams``: the
    scorer's maps of that crop (models, h, w; :func:`gradcam.cam_maps`), drawn as the same
    mean Grad-CAM without running a model (``models`` then unused). ``probability`` and
    ``threshold`` are the patient's, as scored; the caller picks the slice (highest probability).
    """
    cfg = cfg or CropConfig()
    crop = _row(volume, roi, slice_index, cfg)
    if cams is None:
        loaded = _models(models)
        heat, n_models = heatmap(loaded, crop["image"]), len(loaded)
    else:
        heat, n_models = heat_from_cams(cams, cfg.crop_size), len(cams)
    slab, wide = context_slab(volume, roi, slice_index, cfg)
    square = (crop["box_y_min_mm"], crop["box_y_max_mm"], crop["box_z_min_mm"], crop["box_z_max_mm"])
    fig = Figure(figsize=(size / 100, size / 100), dpi=100, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    _draw(fig, slab, wide, heat, square, roi)
    x_mm = float(slice_x(slice_index, cfg.sagittal_thickness_mm))
    _text(fig, caption(probability, threshold, slice_index, x_mm, cfg.sagittal_thickness_mm, n_models))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _sources(source: sr.SourceSeries) -> tuple[list[Dataset], list[Dataset]]:
    """SourceImageSequence items (General Reference) and the ReferencedSeriesSequence item
    (Common Instance Reference) for the source series' instances."""
    purpose = hd.sr.CodedConcept(*codes.DCM.SourceImageForImageProcessingOperation)
    images, instances = [], []
    for sop_class, sop_uid in source.instances:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        instances.append(item)
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = sop_class, sop_uid
        image.PurposeOfReferenceCodeSequence = [purpose]
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = source.series_instance_uid
    series.ReferencedInstanceSequence = instances
    return images, [series]


def secondary_capture(rgb: np.ndarray, source: sr.SourceSeries, patient_id: str, model_id: str,
                      created: datetime.datetime | None = None) -> hd.sc.SCImage:
    """The key image as an SC instance of the source's study, UIDs fixed by patient, series and model.

    It references the source series' instances (SourceImageSequence, purpose "source image for
    image processing operation", and ReferencedSeriesSequence); ``created`` fixes the content and
    capture dates (default now), so the same inputs and time give the same bytes.
    """
    when = created or datetime.datetime.now()
    key = (patient_id, source.series_instance_uid, model_id)
    series_key = (patient_id, source.study.StudyInstanceUID, model_id)  # as the SR's series: one per study
    ds = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(rgb, np.uint8), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=PATIENT_ORIENTATION,
        study_instance_uid=source.study.StudyInstanceUID,
        series_instance_uid=sr.report_uid(*series_key, kind="key-image-series"), series_number=KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=sr.report_uid(*key, kind="key-image"), instance_number=1,
        manufacturer=sr.MANUFACTURER, manufacturer_model_name=str(model_id)[:64],
        series_description=SERIES_DESCRIPTION, content_date=when.date(), content_time=when.time())
    # copied as they are (a pseudonym without "^" is a valid PN that highdicom's check would refuse)
    for keyword in sr.STUDY_KEYWORDS:
        setattr(ds, keyword, source.study.get(keyword, ""))
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = ds.ContentDate, ds.ContentTime
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    for item in ds.get("ContributingEquipmentSequence", []):  # highdicom's own entry, stamped "now"
        item.ContributionDateTime = DT(when)
    ds.ConversionType = "WSD"  # drawn by software on a workstation, not digitised
    # the burned-in text (probability, slice, caution) identifies no patient: PS3.3 C.7.6.1.1.7's "YES"
    # means it would, and de-identification tools then drop the image
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = sr.CAUTION
    ds.DerivationDescription = (f"vfx_ray key image (research, not for diagnostic use): sagittal slab reformat, "
                                f"bone window W{BONE_WINDOW[0]:g}/L{BONE_WINDOW[1]:g}, mean Grad-CAM, ROI box; "
                                f"model {model_id}")
    ds.DerivationCodeSequence = [hd.sr.CodedConcept(*codes.DCM.MultiplanarReformatting)]
    ds.SourceImageSequence, ds.ReferencedSeriesSequence = _sources(source)
    return ds
