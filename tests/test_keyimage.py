"""vfx_ray.export.key_image on a phantom: the ROI outline, bright objects and the heatmap land where their
mm positions map (rows head to feet, columns anterior to posterior), and the Secondary Capture
round-trips with the study's identity and UIDs fixed by patient, series and model."""

from __future__ import annotations

import datetime
import io
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from phantoms import GEOMETRIES, box_hu, cube, series
from pydicom import Dataset
from scipy import ndimage
from torch import nn

from vfx_ray.config import CropConfig
from vfx_ray.export import key_image, sr
from vfx_ray.imaging.dicom import load_volume
from vfx_ray.imaging.geometry import crop_samples
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.ml.gradcam import gradcam
from vfx_ray.ml.model import build_model, save_model

CFG = CropConfig()
SLICE = 0  # x = 0 mm: both cubes fill its 3 mm slab
INSIDE = (0.0, -8.0, -1.0)  # anterior and inferior of the ROI's centre (y -2, z 4), off the square's diagonal
OUTSIDE = (0.0, 18.0, -14.0)  # posterior and inferior, outside the crop square, inside the context
ROI = RoiBox(-2.0, 8.0, -12.0, 8.0, -5.0, 13.0, patient_id="PHANTOM01")  # 20 x 18 mm: not square
P = 0.83
CT = "1.2.840.10008.5.1.4.1.1.2"
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)


class BrightnessNet(nn.Module):
    """layer4: the mean of 8x8 patches; the logit is their mean, so bright patches are the evidence."""

    def __init__(self) -> None:
        super().__init__()
        self.layer4 = nn.Conv2d(3, 1, kernel_size=8, stride=8, bias=False)
        nn.init.constant_(self.layer4.weight, 1 / 192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.layer4(x)).mean(dim=(1, 2, 3))[:, None]


@pytest.fixture(scope="module")
def volume():
    g = GEOMETRIES["head_first"]
    boxes = [((-30, -30, -22), (30, 30, 22), 40.0), cube(INSIDE, 6), cube(OUTSIDE, 6)]
    return load_volume(series(box_hu(g, boxes), g))


@pytest.fixture(scope="module")
def models():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(build_model("resnet18", pretrained="none").eval())
    return out


@pytest.fixture(scope="module")
def image(volume, models):
    return key_image.render(volume, ROI, SLICE, CFG, models, P)


def to_pixel(y_mm: float, z_mm: float, size: int = 512) -> tuple[float, float]:
    """(row, column) pixel centre coordinate where an LPS (y, z) point is drawn."""
    top, left, side = key_image.image_rect(size)
    wide = key_image.context_roi(ROI)
    col = left + (y_mm - wide.y_min) / (wide.y_max - wide.y_min) * side - 0.5
    row = top + (wide.z_max - z_mm) / (wide.z_max - wide.z_min) * side - 0.5
    return row, col


def test_an_rgb_picture_of_the_asked_size(volume, models, image):
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    small = key_image.render(volume, ROI, SLICE, CFG, models[:1], P, size=256)
    assert small.shape == (256, 256, 3)
    with pytest.raises(ValueError, match="not one of the ROI's slices"):
        key_image.render(volume, ROI, 7, CFG, models, P)


def test_the_roi_outline_is_drawn_on_the_roi_extent_not_the_square(image):
    lime = np.all(image == (0, 255, 0), axis=-1)
    rows, cols = np.nonzero(lime)
    assert lime.sum() > 300
    r0, c0 = to_pixel(ROI.y_min, ROI.z_max)  # top left: anterior, superior
    r1, c1 = to_pixel(ROI.y_max, ROI.z_min)
    assert abs(cols.min() - c0) <= 3 and abs(cols.max() - c1) <= 3, (cols.min(), cols.max(), c0, c1)
    assert abs(rows.min() - r0) <= 3 and abs(rows.max() - r1) <= 3, (rows.min(), rows.max(), r0, r1)
    assert not lime[round((r0 + r1) / 2), round((c0 + c1) / 2)]  # an outline, not a filled box


def test_bright_objects_appear_where_their_mm_position_maps(image):
    top, left, side = key_image.image_rect(512)
    region = np.zeros(image.shape[:2], bool)
    region[top : top + side, left : left + side] = True
    bright = region & (image.mean(axis=-1) > 180)  # 1000 HU in W1500/L300, heatmap or not
    labels, n = ndimage.label(bright)
    sizes = ndimage.sum(bright, labels, range(1, n + 1))
    blobs = [np.array(ndimage.center_of_mass(bright, labels, i + 1)) for i in np.argsort(sizes)[::-1][:2]]
    for centre in (INSIDE, OUTSIDE):
        expected = np.array(to_pixel(centre[1], centre[2]))
        assert min(np.abs(b - expected).max() for b in blobs) <= 3, (centre, expected, blobs)


def test_the_heatmap_tints_only_the_crop_square(volume, models, image):
    crop = next(r for r in crop_samples(volume, ROI, CFG) if r["slice_index"] == SLICE)
    heat = key_image.heatmap(models, crop["image"])
    expected = np.mean([gradcam(m, crop["image"][None])[0] for m in models], axis=0)
    assert np.allclose(heat, expected, atol=1e-6) and heat.max() > 0.25
    top, left, side = key_image.image_rect(512)
    (r0, c0), (r1, c1) = to_pixel(crop["box_y_min_mm"], crop["box_z_max_mm"]), to_pixel(
        crop["box_y_max_mm"], crop["box_z_min_mm"])
    colour = image.max(axis=-1).astype(int) - image.min(axis=-1) > 12
    colour &= ~np.all(image == (0, 255, 0), axis=-1)
    square = np.zeros_like(colour)
    square[round(r0) - 2 : round(r1) + 3, round(c0) - 2 : round(c1) + 3] = True
    picture = np.zeros_like(colour)
    picture[top : top + side, left : left + side] = True
    assert not (colour & picture & ~square).any()
    assert (colour & square).sum() > 0.2 * square.sum()


def test_the_heatmap_is_drawn_the_crop_s_way_up(volume):
    # the evidence is the bright cube, anterior and inferior in the ROI: a transposed or flipped
    # map would tint the square's posterior or superior part instead
    image = key_image.render(volume, ROI, SLICE, CFG, [BrightnessNet()], P)
    colour = (image.max(axis=-1).astype(int) - image.min(axis=-1)) * ~np.all(image == (0, 255, 0), axis=-1)
    top, left, side = key_image.image_rect(512)
    colour[:top], colour[top + side :] = 0, 0  # the text bands: the caution is in yellow
    hot = colour > colour.max() / 2
    expected = np.array(to_pixel(INSIDE[1], INSIDE[2]))
    assert np.abs(np.array(ndimage.center_of_mass(hot)) - expected).max() <= 8, expected


def test_models_may_be_files_and_the_caption_says_the_decision(tmp_path, volume, models, image):
    uris = []
    for n, m in enumerate(models):
        uris.append(str(tmp_path / f"fold{n}" / "model.pt"))
        save_model(m, uris[-1], "resnet18")
    assert np.array_equal(key_image.render(volume, ROI, SLICE, CFG, uris, P), image)
    assert key_image.caption(P, 0.5, 3, 9.0, 3.0, 2)[0] == "p(malignant) = 0.83  threshold 0.50 -> malignant"
    assert key_image.caption(0.5, 0.5, 3, 9.0, 3.0, 1)[0].endswith("-> malignant")  # p >= threshold, as scored
    assert key_image.caption(0.31, 0.4, 3, 9.0, 3.0, 1)[0].endswith("threshold 0.40 -> benign")
    assert key_image.caption(P, 0.5, 3, 9.0, 3.0, 1)[1].startswith("slice 3 ")


# ---------------------------------------------------------------- the Secondary Capture


def source(name: str = "PSEUDO7") -> sr.SourceSeries:
    """A study as a pseudonymised run writes it: a name without "^" and blanked fields."""
    study = Dataset()
    for kw in sr.STUDY_KEYWORDS:
        setattr(study, kw, "")
    study.PatientID = study.PatientName = name
    study.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    instances = [(CT, f"1.2.826.0.1.3680043.8.498.3.{i}") for i in range(4)]
    return sr.SourceSeries(study, "1.2.826.0.1.3680043.8.498.2", instances, "1.2.826.0.1.3680043.8.498.4")


def encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sc_bytes(image):
    return encoded(key_image.secondary_capture(image, source(), "PSEUDO7", "model-a", created=WHEN))


def test_the_secondary_capture_round_trips(image, sc_bytes):
    ds = pydicom.dcmread(io.BytesIO(sc_bytes))
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (512, 512, 3, "RGB")
    assert np.array_equal(ds.pixel_array, image)
    src = source()
    assert (ds.PatientID, str(ds.PatientName), ds.StudyInstanceUID) == ("PSEUDO7", "PSEUDO7",
                                                                          src.study.StudyInstanceUID)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and ds.Modality == "OT"
    assert ds.BurnedInAnnotation == "NO" and ds.ImageComments == sr.CAUTION
    assert list(ds.PatientOrientation) == ["P", "F"] and ds.SeriesNumber == key_image.KEY_IMAGE_SERIES_NUMBER
    assert ds.SeriesDescription == key_image.SERIES_DESCRIPTION and ds.Manufacturer == sr.MANUFACTURER
    assert [i.ReferencedSOPInstanceUID for i in ds.SourceImageSequence] == [u for _, u in src.instances]
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.series_instance_uid and len(series.ReferencedInstanceSequence) == 4


def test_uids_are_fixed_by_patient_series_and_model(image, sc_bytes):
    ds = pydicom.dcmread(io.BytesIO(sc_bytes))
    assert ds.SOPInstanceUID == sr.report_uid("PSEUDO7", source().series_instance_uid, "model-a", kind="key-image")
    assert ds.SeriesInstanceUID != ds.SOPInstanceUID
    assert encoded(key_image.secondary_capture(image, source(), "PSEUDO7", "model-a", created=WHEN)) == sc_bytes
    other = key_image.secondary_capture(image, source(), "PSEUDO7", "model-b", created=WHEN)
    assert other.SOPInstanceUID != ds.SOPInstanceUID and other.SeriesInstanceUID != ds.SeriesInstanceUID
    later = key_image.secondary_capture(image, source(), "PSEUDO7", "model-a")  # now: other dates, same UIDs
    assert (later.SOPInstanceUID, later.SeriesInstanceUID) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)


def test_the_sr_can_reference_it(sc_bytes):
    key = pydicom.dcmread(io.BytesIO(sc_bytes))
    row = {"patient_id": "PSEUDO7", "model_id": "model-a", "probability": P, "threshold": 0.5, "n_models": 2,
           "slice_indices": [0, 1, 2], "slice_probabilities": [P, 0.4, 0.2], "vertebra": "L1"}
    with pytest.warns(UserWarning, match="single component"):  # highdicom on the pseudonym, in sr.py
        report = sr.structured_report(row, source(), ROI.bounds, True, [key])
    text = encoded(report)
    assert key.SOPInstanceUID.encode() in text and key.SeriesInstanceUID.encode() in text


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk's dcmdump is not installed")
def test_dcmtk_reads_it(tmp_path, sc_bytes):
    path = tmp_path / "key.dcm"
    path.write_bytes(sc_bytes)
    done = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "E:" not in done.stderr and "SecondaryCaptureImageStorage" in done.stdout


def test_the_context_box_s_slices_alone_draw_the_same_picture(tmp_path, models):
    """The outbox decodes only the slices of the ROI's context box (pipeline.tasks.decode_box):
    the same picture, bit for bit, as from the whole series, from fewer slices."""
    from phantoms import SHAPE, centred_geometry

    from vfx_ray.pipeline import tasks

    shape = (100, *SHAPE[1:])  # a tall series (200 mm): most slices outside the context box
    g = centred_geometry((1, 0, 0), (0, 1, 0), shape)
    boxes = [((-30, -30, -22), (30, 30, 22), 40.0), cube(INSIDE, 6), cube(OUTSIDE, 6)]
    files = series(box_hu(g, boxes, shape), g)
    keys, sizes = [], []
    for name, data in files:
        (tmp_path / name).write_bytes(data)
        keys.append(str(tmp_path / name))
        sizes.append(len(data))
    whole = load_volume(files)
    part = tasks.decode_box(keys, sizes, key_image.context_roi(ROI), CFG)
    assert 0 < part.hu.shape[0] < whole.hu.shape[0] // 2, (part.hu.shape, whole.hu.shape)
    np.testing.assert_array_equal(key_image.render(part, ROI, SLICE, CFG, models, P),
                                  key_image.render(whole, ROI, SLICE, CFG, models, P))


def test_the_scorer_s_maps_draw_the_picture_the_models_draw(volume, models, image):
    from vfx_ray.ml.ensemble import Ensemble

    crop = crop_samples(volume, ROI, CFG, only=SLICE)[0]["image"]
    _, cams = Ensemble(models, "cpu").probabilities_and_cams(crop[None])
    drawn = key_image.render(volume, ROI, SLICE, CFG, [], P, cams=cams[0])
    diff = np.abs(drawn.astype(int) - image.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001  # float rounding at most, in a few pixels
