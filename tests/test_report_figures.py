"""The report's qualitative findings (paper Fig. 3), on hand-made runs whose answers are worked
out by hand: edge vs centre slices, examples among the patients the max rule rescued, the
decision curve's treat-all line per level, the calibration caveat, and Grad-CAM heatmaps by
the fold model that held each patient out (or a note when there is none)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vfx_ray import layout, storage
from vfx_ray.ml.gradcam import gradcam
from vfx_ray.ml.model import build_model, save_model
from vfx_ray.report.curves import calibration_figure, decision_curve_figure, net_benefit, treat_all
from vfx_ray.report.example_run import write_example_run
from vfx_ray.report.heatmaps import example_heatmaps, held_out_folds
from vfx_ray.report.inputs import RunData, load_run, read_crop_images
from vfx_ray.report.render import render_report, slices_section
from vfx_ray.report.slices import edge_centre_table, pick_examples, rescued, slice_positions


def _slices(patients: dict[str, tuple[int, int, list[float]]]) -> pd.DataFrame:
    """patient_id -> (label, first slice_index, probabilities of consecutive slices); rows shuffled."""
    rows = [{"patient_id": pid, "fold": 0, "slice_index": first + j, "probability": p, "label": label}
            for pid, (label, first, probs) in patients.items() for j, p in enumerate(probs)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


def _run(slices: pd.DataFrame, threshold: float = 0.5) -> RunData:
    return RunData("memory://hand-made", "train-cv", slices, {}, {}, threshold, ("benign", "malignant"), {})


POSITIONS = _slices({
    "M1": (1, 10, [0.4, 0.9, 0.6]),  # edges 0.4, 0.6; centre 0.9
    "M2": (1, 5, [0.2, 0.8, 0.7, 0.3]),  # edges 0.2, 0.3; centre (offsets ±0.5) 0.8, 0.7
    "B1": (0, 1, [0.1, 0.3, 0.2, 0.3, 0.1]),  # edges 0.1, 0.1; centre 0.2; inner 0.3, 0.3
    "B2": (0, 7, [0.05]),  # one slice: the centre, not an edge
    "B3": (0, 20, [0.2, 0.4]),  # two slices: both edges, no centre
})


def test_slice_positions_by_hand():
    pos = slice_positions(POSITIONS).set_index(["patient_id", "slice_index"]).sort_index()
    assert pos.loc["M2", "offset"].tolist() == [-1.5, -0.5, 0.5, 1.5]
    assert pos.loc["B1", "offset"].tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert pos.loc["M2", "position"].tolist() == ["edge", "centre", "centre", "edge"]
    assert pos.loc["B1", "position"].tolist() == ["edge", "inner", "centre", "inner", "edge"]
    assert pos.loc["B2", "position"].tolist() == ["centre"] and pos.loc["B3", "position"].tolist() == ["edge"] * 2


def test_edge_centre_table_by_hand():
    table = edge_centre_table(POSITIONS).set_index("Class")
    # malignant: edges (0.4 + 0.6 + 0.2 + 0.3)/4 = 0.375, centres (0.9 + 0.8 + 0.7)/3 = 0.8
    # benign: edges (0.1 + 0.1 + 0.2 + 0.4)/4 = 0.2, centres (0.2 + 0.05)/2 = 0.125
    assert table.index.tolist() == ["malignant", "benign"]
    assert table.loc["malignant", ["Patients", "Edge slices", "Centre slices"]].tolist() == [2, 4, 3]
    assert table.loc["benign", ["Patients", "Edge slices", "Centre slices"]].tolist() == [3, 4, 2]
    assert table.loc["malignant", "Edge mean"] == pytest.approx(0.375)
    assert table.loc["malignant", "Centre mean"] == pytest.approx(0.8)
    assert table.loc["malignant", "Centre − edge"] == pytest.approx(0.425)
    assert table.loc["benign", "Edge mean"] == pytest.approx(0.2)
    assert table.loc["benign", "Centre mean"] == pytest.approx(0.125)
    only_benign = edge_centre_table(POSITIONS[POSITIONS["label"] == 0]).set_index("Class")
    assert only_benign.loc["malignant", "Edge slices"] == 0 and np.isnan(only_benign.loc["malignant", "Edge mean"])


OUTCOMES = _slices({
    "A": (1, 0, [0.3, 0.95, 0.6]),  # TP rescued: min 0.3
    "B": (1, 0, [0.1, 0.5]),  # TP rescued (max exactly at the threshold): min 0.1
    "C": (1, 0, [0.7, 0.99, 0.8]),  # TP, every slice above: the most confident
    "D": (1, 0, [0.45, 0.2]),  # FN
    "E": (1, 0, [0.35, 0.52]),  # TP rescued: min 0.35
    "F": (0, 0, [0.8, 0.3]),  # FP 0.8
    "G": (0, 0, [0.1, 0.05]),  # TN 0.1
    "H": (0, 0, [0.6]),  # FP 0.6
    "I": (0, 0, [0.4, 0.2]),  # TN 0.4
})


def test_rescued_true_positives_are_the_examples_lowest_slice_first():
    saved = rescued(OUTCOMES, 0.5)
    assert saved["patient_id"].tolist() == ["B", "A", "E"]
    assert saved[["min", "max", "n", "below"]].values.tolist() == [[0.1, 0.5, 2, 1], [0.3, 0.95, 3, 1],
                                                                   [0.35, 0.52, 2, 1]]
    picked = pick_examples(_run(OUTCOMES), per_outcome=2)
    assert picked == {"TP": ["B", "A"], "FP": ["F", "H"], "TN": ["G", "I"], "FN": ["D"]}


def test_without_a_rescued_patient_the_examples_fall_back_and_the_report_says_so():
    run = _run(OUTCOMES[~OUTCOMES["patient_id"].isin(["A", "B", "E"])])
    assert rescued(run.slices, 0.5).empty
    assert pick_examples(run, per_outcome=2)["TP"] == ["C"]  # the ordinary, most confident true positive
    section = slices_section(run, per_outcome=1)
    assert any("No true positive was rescued" in t for t in section.text)
    assert any("rescued by the maximum rule" in t and "3 of the 4" in t for t in slices_section(_run(OUTCOMES)).text)


def test_net_benefit_and_treat_all_by_hand():
    pt = np.array([0.2, 0.5])
    assert treat_all(0.25, pt) == pytest.approx([0.25 - 0.75 * 0.25, 0.25 - 0.75 * 1.0])
    # per patient at pt = 0.5: maxima A .95, B .5, C .99, E .52 (TP 4), F .8, H .6 (FP 2) of 9
    patients = _run(OUTCOMES).patients
    assert net_benefit(patients["label"], patients["probability"], pt)[1] == pytest.approx(4 / 9 - 2 / 9 * 1.0)


def test_each_level_of_the_decision_curve_has_its_own_treat_all_line():
    pt = np.array([0.2, 0.5])
    lines = {ln.get_label(): ln.get_ydata() for ln in decision_curve_figure(_run(OUTCOMES), pt).axes[0].lines}
    # 12 of 19 slices are malignant, 5 of 9 patients: NB(treat all) = prev − (1 − prev)·pt/(1 − pt)
    per_slice = next(y for label, y in lines.items() if label.startswith("treat all, per slice"))
    per_patient = next(y for label, y in lines.items() if label.startswith("treat all, per patient"))
    assert per_slice == pytest.approx([12 / 19 - 7 / 19 * 0.25, 12 / 19 - 7 / 19])
    assert per_patient == pytest.approx([5 / 9 - 4 / 9 * 0.25, 5 / 9 - 4 / 9])
    assert lines["model, per patient"][1] == pytest.approx(2 / 9)


def test_calibration_shows_the_patient_maximum_beside_the_slices_with_its_caveat():
    fig = calibration_figure(_run(OUTCOMES))
    labels = [ln.get_label() for ln in fig.axes[0].lines]
    assert any(label.startswith("Per patient (max over slices)") for label in labels)
    assert any(label.startswith("Per slice") for label in labels)
    assert "biased upward" in fig.get_suptitle().replace("\n", " ")


@pytest.fixture(scope="module")
def run_with_models(tmp_path_factory) -> tuple[str, dict[int, torch.nn.Module]]:
    """An example run with different fold models for folds 0 and 1 and a wrong file for fold 2."""
    run = write_example_run(str(tmp_path_factory.mktemp("gradcam") / "in"), n_patients=15)
    models = {}
    for fold in (0, 1):
        torch.manual_seed(fold)
        models[fold] = build_model("resnet18", pretrained="none").eval()
        save_model(models[fold], storage.join(layout.fold_dir(run, fold), layout.MODEL), "resnet18")
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(1)}, buf)  # weights, but not a vfx_ray model file
    storage.write_bytes(storage.join(layout.fold_dir(run, 2), layout.MODEL), buf.getvalue())
    return run, models


def test_grad_cam_uses_the_model_of_the_fold_that_held_the_patient_out(run_with_models):
    uri, models = run_with_models
    run = load_run(uri)
    fold_of = held_out_folds(run, sorted(run.slices["patient_id"].unique()))
    pids = [min(p for p, k in fold_of.items() if k == fold) for fold in (0, 1, 2)]
    images = read_crop_images(run.crops_uri, pids)
    notes: list[str] = []
    maps = example_heatmaps(run, images, notes)
    assert len(notes) == 1 and "fold 2" in notes[0] and "not a vfx_ray model file" in notes[0]
    assert {pid for pid, _ in maps} == set(pids[:2])  # fold 2's patient: crops without heatmaps
    for pid, fold in zip(pids[:2], (0, 1), strict=True):
        keys = sorted(k for k in images if k[0] == pid)
        own = gradcam(models[fold], np.stack([images[k] for k in keys]))
        other = gradcam(models[1 - fold], np.stack([images[k] for k in keys]))
        assert np.allclose(np.stack([maps[k] for k in keys]), own, atol=1e-5)
        assert not np.allclose(own, other, atol=1e-2)


@pytest.mark.slow
def test_report_draws_heatmaps_where_it_has_models_and_says_where_not(run_with_models, tmp_path):
    uri, _ = run_with_models
    out = render_report(uri, str(tmp_path / "out"))
    page = Path(out["html"]).read_text()
    fold_of = held_out_folds(load_run(uri), sorted(load_run(uri).slices["patient_id"].unique()))
    captions = {pid: page[page.index(f"patient {pid}"):].split("<", 1)[0] for pid in fold_of
                if f"patient {pid}" in page}
    assert captions and all(("with Grad-CAM" in c) == (fold_of[pid] < 2) for pid, c in captions.items())
    assert [n for n in out["notes"] if "Grad-CAM" in n] == [n for n in out["notes"] if "fold 2" in n] != []


def test_a_scores_folder_or_a_run_without_models_gets_a_note_not_a_failure(tmp_path):
    uri = write_example_run(str(tmp_path / "in"), n_patients=12)
    run = load_run(uri)
    images = read_crop_images(run.crops_uri, ["EX000"])
    notes: list[str] = []
    assert example_heatmaps(run, images, notes) == {} and "no model.pt there" in notes[0]
    scores = dataclasses.replace(run, kind="scores", slices=run.slices.drop(columns=["fold"]))
    assert example_heatmaps(scores, images, notes) == {} and "scores folder" in notes[1]
    assert example_heatmaps(run, {}, notes) == {} and len(notes) == 2  # no crops: nothing to say here
