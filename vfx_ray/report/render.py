"""``render_report``: a run folder in, report.html + report.md (+ figures/) out.

Sections (their HTML ids): results, roc, confusion, calibration, decision-curve,
slice-probabilities, cohort. Crops and annotations only decorate the report: when they
cannot be found the section says so and the report is still written.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import numpy as np

from vfx_ray import layout, storage
from vfx_ray.report import curves, document, slices, tables
from vfx_ray.report.document import Image, Section
from vfx_ray.report.inputs import TRAIN_CV, RunData, load_run, read_annotations, read_crops

SECTION_IDS = ("results", "roc", "confusion", "calibration", "decision-curve", "slice-probabilities", "cohort")


def _image(name: str, fig: Any, caption: str) -> Image:
    return Image(name, document.png(fig), caption)


def results_section(run: RunData) -> Section:
    m = run.metrics
    text = [f"Threshold {run.threshold:g}: a probability at or above it is called {run.classes[1]}. "
            "A patient's probability is the maximum over its slices (the paper's rule). "
            "Sensitivity and specificity are followed by (hits/cases)."]
    if m.get("auc_ci_method"):
        text.append(f"ROC AUC 95 % CI: {m['auc_ci_method']}. The paper reports no AUC.")
    s = Section("results", "Results beside the paper", text=text, notes=list(run.notes))
    s.tables.append(("Li et al. 2021 (ResNet50, 10-fold CV) and this run"
                     + (", out-of-fold predictions pooled over folds" if run.folds else ""), tables.results_table(run)))
    if run.folds:
        s.tables.append(("Per fold (each fold's test patients) and pooled", tables.fold_table(run)))
    excluded = m.get("unlabelled_patients_excluded") or []
    if excluded:
        s.notes.append(f"{len(excluded)} patients without a label were left out of training: {', '.join(excluded[:20])}"
                       + (" …" if len(excluded) > 20 else ""))
    return s


def curve_sections(run: RunData) -> list[Section]:
    return [
        Section("roc", "ROC curves", images=[_image("roc", curves.roc_figure(run),
                "ROC per slice and per patient (pooled)" + ("; per-patient ROC of each fold" if run.folds else ""))]),
        Section("confusion", "Confusion matrices", images=[_image("confusion", curves.confusion_figure(run),
                "Pooled confusion matrices: rows are the truth, columns the prediction")]),
        Section("calibration", "Calibration", images=[_image("calibration", curves.calibration_figure(run),
                "Reliability diagram (sklearn calibration_curve) and the distribution of probabilities")]),
        Section("decision-curve", "Decision curve", text=[
            "Net benefit = TP/n − FP/n · pt/(1 − pt) at threshold probability pt (Vickers & Elkin 2006); "
            "the model is useful where its curve lies above both treat-all and treat-none."],
            images=[_image("decision_curve", curves.decision_curve_figure(run),
                           "Net benefit vs threshold probability, with treat-all and treat-none")]),
    ]


def _crops_for(run: RunData, patient_ids: list[str], notes: list[str]) -> dict[tuple[str, int], np.ndarray]:
    if not run.crops_uri:
        notes.append("Crops are not shown: the run records no crops dataset (pass crops_uri to render_report).")
        return {}
    try:
        found = read_crops(run.crops_uri, patient_ids)
    except (OSError, ValueError, KeyError) as exc:
        notes.append(
            f"Crops are not shown: cannot read the crops dataset {run.crops_uri} ({type(exc).__name__}: {exc})."
        )
        return {}
    missing = sorted({(p, int(k)) for p, k in run.slices[run.slices["patient_id"].isin(patient_ids)]
                      [["patient_id", "slice_index"]].itertuples(index=False)} - set(found))
    if missing:
        notes.append(f"{len(missing)} of the shown slices have no crop in {run.crops_uri}.")
    return found


def slices_section(run: RunData, per_outcome: int = 2) -> Section:
    s = Section("slice-probabilities", "Per-slice probabilities (paper Fig. 3)", text=[
        "Each bar is one sagittal slice's malignancy probability; the star marks the maximum, which is "
        "the patient's probability. Below each bar: the slice's crop (middle channel of the 3×64×64 input)."])
    picked = slices.pick_examples(run, per_outcome)
    crops = _crops_for(run, sorted({p for ids in picked.values() for p in ids}), s.notes)
    for outcome, ids in picked.items():
        if not ids:
            s.notes.append(f"No {slices.OUTCOMES[outcome]} patients in this run.")
        for i, pid in enumerate(ids):
            fig = slices.slice_probability_figure(run, pid, crops)
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", pid)
            s.images.append(_image(f"slices_{outcome}_{i}_{safe}", fig,
                                   f"{slices.OUTCOMES[outcome].capitalize()} ({outcome}): patient {pid}"))
    return s


def cohort_section(run: RunData) -> Section:
    s = Section("cohort", "Cohort (paper Table 1)")
    if not run.annotations_uri:
        s.notes.append("No annotations known for this run (the crops job's manifest.json names them; "
                       "or pass annotations_uri to render_report): the cohort table is not shown.")
        return s
    try:
        cohort = tables.cohort_frame(run, read_annotations(run.annotations_uri))
    except Exception as exc:  # noqa: BLE001 - any unreadable annotations only cost this section
        s.notes.append(f"Cannot read the annotations {run.annotations_uri} ({type(exc).__name__}: {exc}).")
        return s
    table = tables.cohort_table(cohort) if len(cohort) else None
    if table is None:
        s.notes.append(f"{run.annotations_uri} carries none of {', '.join(tables.COHORT_COLUMNS)} for the run's "
                       "patients: the cohort table is not shown.")
        return s
    s.text.append(f"{len(cohort)} of the run's {run.patients['patient_id'].nunique()} patients found in "
                  f"{run.annotations_uri}. Features: count (%) of patients with the feature present; "
                  "p from a χ² test without continuity correction; age as mean ± SD with Welch's t-test (unequal "
                  "variances: what reproduces the paper's p = 0.001 for age). The paper's p values are recomputed "
                  "here from its published counts by the same tests.")
    s.tables.append(("Imaging features, age and sex by class", table.drop(columns=["p"])))
    return s


def build_sections(run: RunData, per_outcome: int = 2) -> list[Section]:
    return [results_section(run), *curve_sections(run), slices_section(run, per_outcome), cohort_section(run)]


def _meta(run: RunData) -> list[tuple[str, str]]:
    patients = run.patients
    meta = [
        ("Run", run.uri),
        ("Kind", run.kind),
        ("Generated", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("Patients / slices", f"{len(patients)} ({int(patients['label'].sum())} {run.classes[1]}) / {len(run.slices)}"),
    ]
    train = run.config.get("train") or {}
    if run.kind == TRAIN_CV and train:
        meta.append(
            (
                "Model",
                f"{train.get('arch')} (pretrained: {train.get('pretrained')}), {train.get('n_folds')} folds, "
                f"up to {train.get('max_epochs')} epochs, augmentation ×{train.get('augment_factor')}",
            )
        )
    meta += [("Crops", run.crops_uri or "—"), ("Annotations", run.annotations_uri or "—")]
    return meta


def render_report(run_uri: str, out_dir: str, crops_uri: str | None = None,
                  annotations_uri: str | None = None, *, per_outcome: int = 2) -> dict[str, Any]:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.md`` (+ ``figures/``).

    Returns the paths written and the notes the report shows (missing crops/annotations, ...).
    """
    run = load_run(run_uri, crops_uri, annotations_uri)
    sections = build_sections(run, per_outcome)
    title = f"vfx_ray report: {run.kind} run"
    meta = _meta(run)
    html_uri, md_uri = storage.join(out_dir, layout.REPORT_HTML), storage.join(out_dir, layout.REPORT_MD)
    figures = []
    for im in (im for s in sections for im in s.images):
        uri = storage.join(out_dir, "figures", f"{im.name}.png")
        storage.write_bytes(uri, im.png)
        figures.append(uri)
    storage.write_text(md_uri, document.to_markdown(title, meta, sections))
    storage.write_text(html_uri, document.to_html(title, meta, sections))
    return {"html": html_uri, "markdown": md_uri, "figures": figures,
            "notes": [n for s in sections for n in s.notes]}
