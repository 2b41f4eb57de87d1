"""``render_report``: a run folder in, report.html + report.md (+ figures/) out.

Sections (their HTML ids): results, aggregation, comparison (only with a run to compare), roc,
confusion, calibration, decision-curve, slice-position, slice-probabilities, cohort. Crops and annotations only
decorate the report: when they cannot be found the section says so and the report is still written.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import numpy as np

from vfx_ray import layout, storage
from vfx_ray.evaluation import metrics
from vfx_ray.report import curves, document, heatmaps, slices, tables
from vfx_ray.report.document import Image, Section
from vfx_ray.report.inputs import TRAIN_CV, RunData, load_run, middle_channel, read_annotations, read_crop_images

SECTION_IDS = ("results", "aggregation", "roc", "confusion", "calibration", "decision-curve", "slice-position",
               "slice-probabilities", "cohort")


CI_NOTE = ("95 % CI: Wilson for the rates; per-patient AUC by DeLong; per-slice AUC by a patient-level (cluster) "
           "bootstrap, since a patient's slices are not independent cases.")


def _image(name: str, fig: Any, caption: str) -> Image:
    return Image(name, document.png(fig), caption)


def results_section(run: RunData) -> Section:
    m = run.metrics
    text = [f"Threshold {run.threshold:g}: a probability at or above it is called {run.classes[1]}. "
            "A patient's probability is the maximum over its slices (the paper's rule). "
            "Sensitivity and specificity are followed by (hits/cases)."]
    if m.get("auc_ci_method"):
        text.append(f"95 % CIs: sensitivity, specificity and accuracy by the {m.get('rate_ci_method', 'Wilson')} "
                    f"method; ROC AUC per patient by {m['auc_ci_method']}; ROC AUC per slice by a "
                    f"{m.get('auc_cluster_ci_method', 'patient-level bootstrap')} - a patient's slices are not "
                    "independent, so DeLong's per-slice CI, which counts every slice as a case, is too narrow. "
                    "The paper reports no AUC and no CIs.")
    s = Section("results", "Results beside the paper", text=text, notes=list(run.notes))
    s.tables.append(("Li et al. 2021 (ResNet50, 10-fold CV) and this run"
                     + (", out-of-fold predictions pooled over folds" if run.folds else "") + ". " + CI_NOTE,
                     tables.results_table(run)))
    if run.folds:
        s.tables.append(("Per fold (each fold's test patients) and pooled. " + CI_NOTE, tables.fold_table(run)))
    excluded = m.get("unlabelled_patients_excluded") or []
    if excluded:
        s.notes.append(f"{len(excluded)} patients without a label were left out of training: {', '.join(excluded[:20])}"
                       + (" …" if len(excluded) > 20 else ""))
    return s


def aggregation_section(run: RunData) -> Section:
    agg = run.metrics.get("aggregation") or metrics.aggregation_rules(run.slices, run.threshold)
    s = Section("aggregation", "Patient aggregation rules", notes=list(agg.get("notes", [])), text=[
        "A patient's probability from its slices by the paper's rule (max, the primary analysis) against the mean "
        f"of its slices and its centre slice ({agg['centre_rule'].removeprefix('centre: ')}). Same patients, same "
        f"threshold {run.threshold:g}; each rule's AUC is compared with max by the paired DeLong test."])
    s.tables.append(("Per patient, pooled: AUC (DeLong 95 % CI), rates (Wilson 95 % CI), paired DeLong against max",
                     tables.aggregation_table(agg)))
    return s


def comparison_section(run: RunData, other: RunData) -> Section:
    """Run A (this report's) against run B on their shared patients; ValueError when none is shared."""
    c = metrics.compare_runs(run.slices, other.slices)
    s = Section("comparison", "Comparison with run B", text=[
        f"A = {run.uri}; B = {other.uri}. Paired DeLong test of A's AUC against B's on the {c['n_shared']} "
        f"patients both runs predicted (patient probability: max over slices). Not shared, so not compared: "
        f"{c['only_a']} patients only in A, {c['only_b']} only in B."])
    if c["per_slice"] is None:
        s.notes.append("The shared patients' slices (patient_id, slice_index) differ between A and B: "
                       "compared per patient only.")
    else:
        s.text.append("Per slice: the same slices in both runs; this test counts every slice as an independent case, "
                      "so its p is optimistic - the per-patient test is the one to read.")
    s.tables.append(("A against B (difference A − B, 95 % CI from DeLong's paired variance)",
                     tables.comparison_table(c)))
    return s


def curve_sections(run: RunData) -> list[Section]:
    return [
        Section("roc", "ROC curves", images=[_image("roc", curves.roc_figure(run),
                "ROC per slice and per patient (pooled)" + ("; per-patient ROC of each fold" if run.folds else ""))]),
        Section("confusion", "Confusion matrices", images=[_image("confusion", curves.confusion_figure(run),
                "Pooled confusion matrices: rows are the truth, columns the prediction")]),
        Section("calibration", "Calibration", text=["Caveat: " + curves.MAX_BIAS + " Read the per-slice curve for the "
                "model's own calibration; the per-patient one says how far the maximum over-states the risk."],
                images=[_image("calibration", curves.calibration_figure(run),
                "Reliability diagram (sklearn calibration_curve) of the per-patient maximum and of the slices, "
                "and the distribution of probabilities")]),
        Section("decision-curve", "Decision curve", text=[
            "Net benefit = TP/n − FP/n · pt/(1 − pt) at threshold probability pt (Vickers & Elkin 2006); "
            "the model is useful where its curve lies above both treat-all and treat-none. Each level is drawn "
            "against its own treat-all line, from its own prevalence (a share of slices is not a share of "
            "patients)."],
            images=[_image("decision_curve", curves.decision_curve_figure(run),
                           "Net benefit vs threshold probability, per patient and per slice, each with its own "
                           "treat-all line (dashed), and treat-none")]),
    ]


def _crops_for(run: RunData, patient_ids: list[str], notes: list[str]) -> dict[tuple[str, int], np.ndarray]:
    """The shown slices' whole crops (C×S×S); {} with a note when the crops cannot be read."""
    if not run.crops_uri:
        notes.append("Crops are not shown: the run records no crops dataset (pass crops_uri to render_report).")
        return {}
    try:
        found = read_crop_images(run.crops_uri, patient_ids)
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


def position_section(run: RunData) -> Section:
    """Edge vs centre slices over the whole run: the partial-volume pattern of the paper's Fig. 3."""
    table = slices.edge_centre_table(run.slices, run.classes)
    shown = table.assign(**{c: table[c].map(lambda v: tables.fmt(v)) for c in ("Edge mean", "Centre mean",
                                                                                "Centre − edge")})
    return Section("slice-position", "Edge vs centre slices (partial volume, paper Fig. 3)", text=[
        "The paper explains its low edge-slice probabilities by partial volume: the first and last slices of the "
        "ROI mix abnormal with normal tissue. Here every slice is placed by its distance from the middle of its "
        "patient's slices (0 = centre; ±0.5, ±1.5 … when a patient has an even number of slices); edge = first "
        "or last slice, centre = the middle slice (or the middle two)."],
        tables=[("Mean slice probability at the edges and at the centre of the ROI, per class (pooled over "
                 "patients; n = slices)", shown)],
        images=[_image("slice_position", slices.position_figure(run),
                       "Left: mean ± SD of the slice probability at each distance from the ROI centre, per class; "
                       "right: edge vs centre slices per class")])


def _examples_text(run: RunData, picked: dict[str, list[str]]) -> str:
    """Which true positives are shown: rescued by the max rule, or (none rescued) the most confident."""
    saved = slices.rescued(run.slices, run.threshold)
    n_tp = int((slices.outcomes(run.patients, run.threshold) == "TP").sum())
    if saved.empty:
        return (f"No true positive was rescued by the maximum rule (none of the {n_tp} has a slice below the "
                "threshold): the true-positive examples are the most confident ones instead.")
    return (f"{len(saved)} of the {n_tp} true positives were rescued by the maximum rule: at least one slice "
            f"below the threshold {run.threshold:g}, the maximum at or above it - the paper's Fig. 3 point. "
            "The true-positive examples are those with the lowest slice. False positives and negatives are the "
            "most confidently wrong, true negatives the most confident.")


def slices_section(run: RunData, per_outcome: int = 2) -> Section:
    s = Section("slice-probabilities", "Per-slice probabilities (paper Fig. 3)", text=[
        "Each bar is one sagittal slice's malignancy probability; the star marks the maximum, which is "
        "the patient's probability. Below each bar: the slice's crop (middle channel of the 3×64×64 input) and "
        "under it the same crop with its Grad-CAM heatmap (Selvaraju et al. 2017; last convolutional block, "
        "malignant logit; red = most evidence for malignancy) by the fold model that held the patient out."])
    picked = slices.pick_examples(run, per_outcome)
    s.text.append(_examples_text(run, picked))
    images = _crops_for(run, sorted({p for ids in picked.values() for p in ids}), s.notes)
    crops = {key: middle_channel(image) for key, image in images.items()}
    maps = heatmaps.example_heatmaps(run, images, s.notes)
    saved = set(slices.rescued(run.slices, run.threshold)["patient_id"])
    for outcome, ids in picked.items():
        if not ids:
            s.notes.append(f"No {slices.OUTCOMES[outcome]} patients in this run.")
        for i, pid in enumerate(ids):
            fig = slices.slice_probability_figure(run, pid, crops, maps)
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", pid)
            how = ", rescued by the maximum rule" if pid in saved else ""
            s.images.append(_image(f"slices_{outcome}_{i}_{safe}", fig,
                                   f"{slices.OUTCOMES[outcome].capitalize()} ({outcome}{how}): patient {pid}"
                                   + (", with Grad-CAM" if any(k[0] == pid for k in maps) else "")))
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
                  "p from a χ² test without continuity correction, or from Fisher's exact test where a 2×2 "
                  "table has an expected count below 5 (the Test column says which); age as mean ± SD with "
                  "Welch's t-test (unequal variances: what reproduces the paper's p = 0.001 for age). The paper's "
                  "p values are recomputed here from its published counts by the same rules.")
    s.tables.append(("Imaging features, age and sex by class", table.drop(columns=["p"])))
    return s


def build_sections(run: RunData, per_outcome: int = 2, extra: list[Section] | None = None) -> list[Section]:
    """The report's sections; ``extra`` (the comparison with another run) follows the results."""
    return [results_section(run), aggregation_section(run), *(extra or []), *curve_sections(run),
            position_section(run), slices_section(run, per_outcome), cohort_section(run)]


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
    tuning = run.metrics.get("params_protocol")  # which protocol chose lr/L2: how honest the estimate is
    if tuning:
        meta.append(("Tuned parameters", tuning.get("description") or tuning.get("protocol", "—")))
    meta += [("Crops", run.crops_uri or "—"), ("Annotations", run.annotations_uri or "—")]
    return meta


def render_report(run_uri: str, out_dir: str, crops_uri: str | None = None,
                  annotations_uri: str | None = None, *, per_outcome: int = 2,
                  compare_uri: str | None = None) -> dict[str, Any]:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.md`` (+ ``figures/``).

    ``compare_uri``: a second run (B) compared with this one; it is read, and the comparison
    made, before any figure is drawn, so a wrong B fails fast. Returns the paths written and
    the notes the report shows (missing crops/annotations, ...).
    """
    run = load_run(run_uri, crops_uri, annotations_uri)
    extra = [comparison_section(run, load_run(compare_uri))] if compare_uri else []
    sections = build_sections(run, per_outcome, extra)
    title = f"vfx_ray report: {run.kind} run"
    meta = _meta(run) + ([("Compared with (B)", compare_uri)] if compare_uri else [])
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
