"""Clinical studies from ``vfx-ray synth --clinical``: the study layout, readers that are not
ours (SimpleITK, dcmtk) accept every object, and with no series named the crops are those of
the bone-kernel axial series alone (issue 15). Small matrices and 3 mm slices keep this fast;
the layout is the one of the 512x512, 1.25 mm preset."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from vfx_ray import storage
from vfx_ray.config import CropConfig, clinical_synth
from vfx_ray.imaging import dicom
from vfx_ray.imaging.annotations import read_annotations
from vfx_ray.synth.cohort import generate_cohort
from vfx_ray.synth.patient import FOV_PADDING_HU

SMALL = dict(matrix=128, slice_thickness_mm=3.0)  # the preset's layout and coverage, fewer pixels
DCMTK = shutil.which("dcmdump") is not None
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="dcmtk is not installed (Debian: apt-get install -y dcmtk)")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clinical")
    generate_cohort(str(root), clinical_synth(patients=1, seed=4, slice_spacing_mm=1.5, **SMALL), workers=1,
                    progress=False)
    return root


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    generate_cohort(str(root), clinical_synth(patients=1, seed=4, dicomdir=True, **SMALL), workers=1, progress=False)
    return root


def index_of(root: Path) -> list[dict]:
    files = sorted(p for p in (root / "dicom").rglob("*") if p.is_file())
    return dicom.group_series([dicom.read_header(p.read_bytes(), str(p)) for p in files])


@pytest.mark.slow
def test_the_study_holds_the_series_of_a_spine_ct_export(study):
    by_description = {s["series_description"]: s for s in index_of(study)}
    assert set(by_description) == {"Scout", "3mm BONE", "3mm STND", "SAG BONE 3mm", "COR BONE 3mm", "Dose Report",
                                   "Dose Info"}
    bone, soft = by_description["3mm BONE"], by_description["3mm STND"]
    assert (bone["image_type"], bone["convolution_kernel"], bone["plane"]) == (
        "ORIGINAL\\PRIMARY\\AXIAL", "BONE", "axial")
    assert soft["convolution_kernel"] == "STANDARD" and soft["instance_count"] == bone["instance_count"]
    assert by_description["Scout"]["image_type"].endswith("LOCALIZER")
    assert by_description["SAG BONE 3mm"]["plane"] == "sagittal"
    assert by_description["COR BONE 3mm"]["plane"] == "coronal"
    report = by_description["Dose Report"]
    assert report["object_kind"] == "non-image" and report["modality"] == "SR"
    assert by_description["Dose Info"]["sop_class_uid"] == pydicom.uid.SecondaryCaptureImageStorage
    # thoracolumbar coverage, overlapping slices (1.5 mm apart, 3 mm thick)
    z = bone["extent_mm"][4:]
    assert 430 <= z[1] - z[0] <= 560, z
    assert bone["slice_thickness"] == 3.0 and bone["instance_count"] == pytest.approx((z[1] - z[0]) / 1.5 + 1, abs=1)
    ann = read_annotations(str(study / "annotations.csv"))
    assert ann["series_instance_uid"].tolist() == [bone["series_instance_uid"]]


@pytest.mark.slow
def test_outside_the_field_of_view_is_padding_that_decodes_to_air(study):
    bone = next(s for s in index_of(study) if s["series_description"] == "3mm BONE")
    ds = pydicom.dcmread(bone["object_keys"][0])
    stored = ds.pixel_array
    assert ds.PixelPaddingValue == FOV_PADDING_HU + 1024 and stored[0, 0] == ds.PixelPaddingValue
    assert stored[64, 64] != ds.PixelPaddingValue  # the centre is inside the field of view
    volume = dicom.load_volume([(k, Path(k).read_bytes()) for k in bone["object_keys"]], CropConfig())
    assert volume.hu[:, 0, 0].max() == dicom.AIR_HU


@pytest.mark.slow
def test_simpleitk_reads_the_bone_series_as_our_reader_does(study):
    bone = next(s for s in index_of(study) if s["series_description"] == "3mm BONE")
    folder = str(Path(bone["object_keys"][0]).parent)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, bone["series_instance_uid"]))
    image = reader.Execute()
    ours = dicom.load_volume([(k, Path(k).read_bytes()) for k in bone["object_keys"]], CropConfig())
    assert image.GetSize()[2] == ours.hu.shape[0]
    theirs = sitk.GetArrayFromImage(image).astype(np.float32)
    inside = ours.hu > dicom.AIR_HU  # GDCM leaves padding as stored; we make it air
    np.testing.assert_allclose(theirs[inside], ours.hu[inside], atol=0.5)


@pytest.mark.slow
@needs_dcmtk
def test_dcmtk_parses_every_object_and_the_dose_report(study, media):
    files = [p for root in (study, media) for p in (root / "dicom").rglob("*") if p.is_file()]
    failed = [str(p) for p in files if subprocess.run(["dcmdump", "-q", "-E", str(p)], capture_output=True).returncode]
    assert not failed, failed[:3]
    report = next(s for s in index_of(study) if s["modality"] == "SR")["object_keys"][0]
    out = subprocess.run(["dsrdump", report], capture_output=True, text=True)
    assert out.returncode == 0 and "CT Dose Length Product Total" in out.stdout, out.stderr


@pytest.mark.slow
def test_the_media_layout_has_a_dicomdir_that_indexes_every_file(media):
    folder = media / "dicom" / "VFX0001"
    fileset = pydicom.fileset.FileSet(pydicom.dcmread(folder / "DICOMDIR"))
    listed = {Path(i.path).resolve() for i in fileset}
    files = {p.resolve() for p in folder.rglob("*") if p.is_file() and p.name != "DICOMDIR"}
    assert listed == files and len(files) == sum(s["instance_count"] for s in index_of(media)[:-1])
    assert index_of(media)[-1]["object_kind"] == "directory"


def crops_of_unnamed_and_bone_only(root: Path, tmp_path: Path) -> tuple[dict, dict, str]:
    """The crops job on the whole study with no series named, and on an archive of its bone
    series alone: (both summaries, the bone series uid)."""
    from vfx_ray.stages.crops import run_crops

    ann = read_annotations(str(root / "annotations.csv"))
    bone_uid = ann["series_instance_uid"][0]
    ann.assign(series_instance_uid=None).to_csv(tmp_path / "unnamed.csv", index=False)
    full = run_crops(str(root / "dicom"), str(tmp_path / "unnamed.csv"), str(tmp_path / "full"), progress=False)
    bone_only = tmp_path / "bone_only"
    bone_only.mkdir()
    (bone,) = [s for s in index_of(root) if s["series_instance_uid"] == bone_uid]
    for key in bone["object_keys"]:
        shutil.copy(key, bone_only / Path(key).name)
    alone = run_crops(str(bone_only), str(tmp_path / "unnamed.csv"), str(tmp_path / "alone"), progress=False)
    assert full["errors"] == 0 and alone["errors"] == 0 and full["crops"] == alone["crops"] > 0
    a, b = (storage.read_table(str(tmp_path / o / "crops.parquet")).to_pandas() for o in ("full", "alone"))
    pd.testing.assert_frame_equal(a.drop(columns=["image"]), b.drop(columns=["image"]))
    np.testing.assert_array_equal(np.stack(a["image"].map(np.asarray)), np.stack(b["image"].map(np.asarray)))
    return full, alone, bone_uid


@pytest.mark.slow
def test_with_no_series_named_the_crops_are_those_of_the_bone_series_alone(media, tmp_path, ray_session):
    """The must-hold of issue 15, on the DICOM media layout (DICOMDIR included): every object is
    accounted for, no error row, and the crops equal those of an archive of the bone series."""
    _, _, bone_uid = crops_of_unnamed_and_bone_only(media, tmp_path)
    index = storage.read_table(str(tmp_path / "full" / "series_index.parquet")).to_pandas()
    assert index.loc[index["selected"], "series_instance_uid"].tolist() == [bone_uid]
    assert set(index["selection"].dropna()) >= {"selected", "a localizer", "not CT"}
    listed = {e.uri for e in storage.list_files(str(media / "dicom"))}
    assert {k for keys in index["object_keys"] for k in keys} == listed  # every object accounted for


@pytest.mark.slow
def test_a_full_size_clinical_study_gives_the_crops_of_its_bone_series(tmp_path, ray_session):
    """The same at the preset's size: 512x512, 1.25 mm slices over T1-S1 (one patient)."""
    root = tmp_path / "study"
    generate_cohort(str(root), clinical_synth(patients=1, seed=2), workers=1, progress=False)
    bone = next(s for s in index_of(root) if s["series_description"] == "1.25mm BONE")
    assert (bone["rows"], bone["columns"]) == (512, 512) and bone["instance_count"] >= 300
    full, _, _ = crops_of_unnamed_and_bone_only(root, tmp_path)
    assert full["patients_with_crops"] == 1


@pytest.mark.slow
def test_score_chooses_the_same_series(media, tmp_path, ray_session):
    """Score shares the pipeline: with no series named it scores the bone series."""
    import torch

    from vfx_ray.ml.model import build_model, save_model
    from vfx_ray.stages.score import run_score

    ann = read_annotations(str(media / "annotations.csv"))
    ann.assign(series_instance_uid=None, label=None).to_csv(tmp_path / "unnamed.csv", index=False)
    torch.manual_seed(0)
    save_model(build_model("resnet18", pretrained="none"), str(tmp_path / "model.pt"), "resnet18")
    summary = run_score(str(media / "dicom"), str(tmp_path / "unnamed.csv"), str(tmp_path / "model.pt"),
                        str(tmp_path / "scores"), progress=False)
    scores = storage.read_table(str(tmp_path / "scores" / "scores.parquet")).to_pandas()
    assert summary["errors"] == 0 and scores["series_instance_uid"].tolist() == ann["series_instance_uid"].tolist()


def test_the_clinical_preset_mixes_overlapping_reconstructions_and_leaves_the_default_cohort_alone():
    from vfx_ray.config import SynthConfig
    from vfx_ray.synth.cohort import plan_cohort

    specs = plan_cohort(clinical_synth(patients=40, seed=1))
    overlapping = [s.spacing_mm < s.slice_thickness_mm for s in specs]
    assert 0 < sum(overlapping) < len(specs) and {s.spacing_mm for s in specs} == {0.625, 1.25}
    assert {(s.matrix, s.coverage, s.study, s.fov_mask) for s in specs} == {(512, "thoracolumbar", "clinical", True)}
    default = plan_cohort(SynthConfig(patients=12, seed=1))  # no new draw: the same plan as before
    assert all(s.spacing_mm == s.slice_thickness_mm == 3.0 and s.coverage == "segment" for s in default)
