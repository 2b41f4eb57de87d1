"""The report: every section and figure, Table 1 statistics by hand, missing inputs, scores
folders, s3:// runs, a real browser, and (slow) a report of a real tiny train-cv run."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy.stats import t as student_t
from sklearn.metrics import roc_auc_score

from vfx_ray import contracts, storage
from vfx_ray.cli import main
from vfx_ray.evaluation import metrics
from vfx_ray.report import tables
from vfx_ray.report.curves import net_benefit
from vfx_ray.report.example_run import example_slices, write_example_run
from vfx_ray.report.inputs import load_run
from vfx_ray.report.render import SECTION_IDS, render_report
from vfx_ray.report.slices import pick_examples
from vfx_ray.report.tables import cohort_table
from vfx_ray.stages import score

IMG = '<img src="data:image/png;base64,'
N_FIGURES = 5 + 4 * 2  # ROC, confusion, calibration, decision curve, edge vs centre + 2 examples of TP/FP/TN/FN
NO_MODELS = "Grad-CAM heatmaps are not shown for folds 0, 1, 2: the run has no model.pt there"  # example runs
CHROMIUM = shutil.which("chromium")
CONSOLE_ERRORS = re.compile(r"CONSOLE|Uncaught|Not allowed to load local resource|net::ERR_")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[str, dict]:
    root = tmp_path_factory.mktemp("report")
    run = write_example_run(str(root / "in"))
    return run, render_report(run, str(root / "out"))


@pytest.mark.slow
def test_report_has_every_section_table_and_figure(rendered):
    run, out = rendered
    page = Path(out["html"]).read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page, sid
    assert page.count(IMG) == N_FIGURES == len(out["figures"])
    for b64 in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    # self-contained: nothing fetched from anywhere, no scripts
    assert not re.search(r'<script|<link|src="(?!data:)|url\(', page)
    assert len(out["notes"]) == 1 and out["notes"][0].startswith(NO_MODELS)
    # the paper's figures beside ours, numbers as in metrics.json
    m = json.loads(storage.read_text(storage.join(run, "metrics.json")))
    pooled = m["pooled"]["per_patient"]
    assert f"{pooled['sensitivity']:.3f} ({pooled['tp']}/{pooled['n_malignant']})" in page
    assert f"{pooled['auc']:.3f} ({pooled['auc_ci_low']:.3f}–{pooled['auc_ci_high']:.3f})" in page
    assert "<td>0.95</td>" in page and "<td>0.79</td>" in page  # paper per patient sens., per slice spec.
    for fold in range(3):
        assert f"<td>{fold}</td>" in page
    assert "Bone destruction" in page and "Paravertebral soft tissue mass" in page
    for outcome in ("TP", "FP", "TN", "FN"):
        assert page.count(f'id="fig-slices_{outcome}_') == 2
    md = Path(out["markdown"]).read_text()
    links = re.findall(r"!\[[^]]*\]\((figures/[^)]+\.png)\)", md)
    assert len(links) == N_FIGURES and all((Path(out["markdown"]).parent / link).is_file() for link in links)
    for sid in SECTION_IDS:
        assert f'<a id="{sid}"></a>' in md
    assert "| Per patient | Sensitivity | 0.95 |" in md


@pytest.mark.slow
def test_examples_are_rescued_true_positives_and_the_most_confident_others(rendered):
    run = load_run(rendered[0])
    patients = run.patients.set_index("patient_id")
    picked = pick_examples(run, per_outcome=2)
    fn = patients[(patients.label == 1) & (patients.probability < 0.5)].probability
    assert picked["FN"] == fn.sort_values().index[:2].tolist()
    lowest = run.slices.groupby("patient_id")["probability"].min()
    rescued_tp = lowest[(patients.label == 1) & (patients.probability >= 0.5) & (lowest < 0.5)]
    assert len(rescued_tp) > 2 and picked["TP"] == rescued_tp.sort_values().index[:2].tolist()
    page = Path(rendered[1]["html"]).read_text()
    assert f"{len(rescued_tp)} of the " in page and "rescued by the maximum rule" in page


def test_table1_p_values_equal_a_hand_computation():
    # 20 malignant (15 with compression, 15 male), 20 benign (5 with it, 5 male): the 2×2 table
    # [[15, 5], [5, 15]] (every expected count 10) gives χ² = n(ad − bc)² / (row and column sums)
    # = 40·200²/20⁴ = 10 with 1 df, so p = P(χ²₁ > 10) = erfc(√(10/2)) = erfc(√5).
    cohort = pd.DataFrame({
        "label": [1] * 20 + [0] * 20,
        "compression": [1] * 15 + [0] * 5 + [1] * 5 + [0] * 15,
        "soft_tissue_mass": [1] * 3 + [0] * 37,  # rare: expected counts 1.5 < 5, Fisher's exact test
        "bone_destruction": [0] * 40,  # absent everywhere: no test
        "sex": ["M", "male", "M"] * 5 + ["F"] * 5 + ["M"] * 5 + ["female", "F", "F"] * 5,
        "age": [50, 60, 55, 45] * 5 + [70, 80, 75, 65] * 5,
    })
    table = cohort_table(cohort).set_index("Parameter")
    assert table.loc["Vertebral compression", "p"] == pytest.approx(math.erfc(math.sqrt(5)), rel=1e-12)
    assert table.loc["Vertebral compression", "Test"] == "χ²"
    assert table.loc["Vertebral compression", "Malignant (N = 20)"] == "15 (75.0%)"
    assert table.loc["Gender (male/female)", "p"] == pytest.approx(math.erfc(math.sqrt(5)), rel=1e-12)
    assert table.loc["Gender (male/female)", "Benign (N = 20)"] == "5/15"
    # Fisher: with 3 patients having the mass, X (those malignant) is hypergeometric, P(X = x) =
    # C(3, x)·C(37, 20 − x)/C(40, 20); observed x = 3. The two-sided p sums the outcomes no more
    # likely than it: P(3) = P(0) = 20·19·18/(40·39·38) = 3/26, so p = 3/13.
    pmf = [math.comb(3, x) * math.comb(37, 20 - x) / math.comb(40, 20) for x in range(4)]
    assert sum(q for q in pmf if q <= pmf[3]) == pytest.approx(3 / 13, rel=1e-12)
    assert table.loc["Paravertebral soft tissue mass", "p"] == pytest.approx(3 / 13, rel=1e-12)
    assert table.loc["Paravertebral soft tissue mass", "Test"] == "Fisher exact (paper: χ²)"
    assert table.loc["Bone destruction", "p value"] == "n/a"
    # Welch: t = (52.5 − 72.5) / √(s₁²/20 + s₂²/20), equal s² = 625/19 in both; df by Welch–Satterthwaite = 38
    s2 = np.var([50, 60, 55, 45] * 5, ddof=1)
    t_stat = (52.5 - 72.5) / math.sqrt(2 * s2 / 20)
    assert table.loc["Age (years)", "p"] == pytest.approx(2 * student_t.sf(abs(t_stat), 38), rel=1e-9)
    assert table.loc["Age (years)", "Malignant (N = 20)"] == "52.5 ± 5.7"
    # the same tests on the paper's published counts give the paper's published p values
    assert table["Paper p"].to_dict() == {
        "Age (years)": "0.001", "Gender (male/female)": "< 0.001", "Vertebral compression": "< 0.001",
        "Paravertebral soft tissue mass": "< 0.001", "Bone destruction": "< 0.001"}
    assert cohort_table(cohort[["label"]]) is None


@pytest.mark.slow
def test_report_shows_wilson_and_clustered_cis_and_the_aggregation_rules(rendered):
    run, out = rendered
    page = Path(out["html"]).read_text()
    m = json.loads(storage.read_text(storage.join(run, "metrics.json")))
    patient, slice_ = m["pooled"]["per_patient"], m["pooled"]["per_slice"]
    k, n = patient["tp"], patient["n_malignant"]  # Wilson interval of the per-patient sensitivity, by hand
    z = 1.959963984540054
    centre, half = (k / n + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(
        k / n * (1 - k / n) / n + z * z / (4 * n * n))
    assert f"<td>{centre - half:.3f}–{centre + half:.3f}</td>" in page
    # per slice: the patient-level bootstrap CI, never DeLong's slices-as-cases one
    assert f"<td>{slice_['auc_cluster_ci_low']:.3f}–{slice_['auc_cluster_ci_high']:.3f}</td>" in page
    assert f"{slice_['auc']:.3f} ({slice_['auc_ci_low']:.3f}–{slice_['auc_ci_high']:.3f})" not in page
    assert "patient-level (cluster) bootstrap: 2000 resamples" in page
    section = page[page.index('<section id="aggregation">'):]
    section = re.sub(r">\s+<", "><", section[:section.index("</section>")])
    assert "Patient aggregation rules" in section and "Centre slice" in section and "Mean of slices" in section
    rules = m["aggregation"]["rules"]
    for rule in ("mean", "centre"):
        patients = metrics.per_patient(load_run(run).slices, rule)
        assert rules[rule]["auc"] == pytest.approx(roc_auc_score(patients["label"], patients["probability"]))
        assert f"<td>{tables.fmt_p(rules[rule]['p_vs_max'])}</td>" in section


def two_runs(tmp_path: Path, drop: int = 4) -> tuple[str, str]:
    """Run A (example run) and run B: A's first ``drop`` patients left out, the others' slices rescored."""
    a = write_example_run(str(tmp_path / "a"), n_patients=24, crops=False)
    b = write_example_run(str(tmp_path / "b"), n_patients=24, crops=False)
    oof = pd.read_parquet(Path(b) / "oof_predictions.parquet")
    oof = oof[~oof["patient_id"].isin(sorted(oof["patient_id"].unique())[:drop])]
    noisy = oof["probability"] + np.random.default_rng(1).normal(0, 0.25, len(oof))
    oof = oof.assign(probability=noisy.clip(0.001, 0.999))
    oof.to_parquet(Path(b) / "oof_predictions.parquet", index=False)
    (Path(b) / "metrics.json").unlink()
    return a, b


@pytest.mark.slow
def test_cli_report_compare_two_runs(tmp_path, capsys):
    a, b = two_runs(tmp_path)
    out = tmp_path / "out"
    assert main(["report", "--run", a, "--out", str(out), "--compare", b]) == 0
    page = (out / "report.html").read_text()
    section = page[page.index('<section id="comparison">'):]
    section = re.sub(r">\s+<", "><", section[:section.index("</section>")])
    assert "Comparison with run B" in section and "4 patients only in A, 0 only in B" in section
    pa, pb = (metrics.per_patient(load_run(r).slices).set_index("patient_id")["probability"] for r in (a, b))
    shared = pb.index
    label = metrics.per_patient(load_run(a).slices).set_index("patient_id").loc[shared, "label"]
    auc_a, auc_b = roc_auc_score(label, pa[shared]), roc_auc_score(label, pb[shared])
    assert f"<td>20 patients</td><td>{auc_a:.3f}</td><td>{auc_b:.3f}</td><td>{auc_a - auc_b:+.3f} (" in section
    c = metrics.compare_runs(load_run(a).slices, load_run(b).slices)
    assert f"<td>{tables.fmt_p(c['per_patient']['p'])}</td>" in section
    assert f"<td>{c['per_slice']['n']} slices</td>" in section  # same slices of the shared patients
    assert "Compared with (B)" in page and "Compared with (B)" in (out / "report.md").read_text()


def test_cli_report_compare_fails_fast_on_a_wrong_run_b(tmp_path, capsys, monkeypatch):
    from vfx_ray.report import render as render_mod

    monkeypatch.setattr(render_mod, "build_sections", lambda *a, **k: pytest.fail("drew the report before B"))
    a, b = two_runs(tmp_path)
    for other, message in ((str(tmp_path / "nowhere"), "holds neither oof_predictions.parquet"),
                           (b, "share no patient")):
        if other == b:  # no shared patient: B's patients renamed
            oof = pd.read_parquet(Path(b) / "oof_predictions.parquet")
            oof.assign(patient_id="B" + oof["patient_id"]).to_parquet(Path(b) / "oof_predictions.parquet")
        rc = main(["report", "--run", a, "--out", str(tmp_path / "out"), "--compare", other])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.startswith("vfx-ray report: error:") and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


def test_net_benefit_matches_its_definition():
    y, p = np.array([1, 1, 0, 0, 1]), np.array([0.9, 0.4, 0.6, 0.1, 0.7])
    nb = net_benefit(y, p, np.array([0.5, 0.2]))
    assert nb[0] == pytest.approx(2 / 5 - 1 / 5 * 1.0)  # TP 0.9, 0.7; FP 0.6
    assert nb[1] == pytest.approx(3 / 5 - 1 / 5 * 0.25)


@pytest.mark.slow
def test_missing_crops_and_annotations_are_said_not_fatal(tmp_path):
    run = write_example_run(str(tmp_path / "in"), n_patients=24, crops=False)
    out = render_report(run, str(tmp_path / "out"))
    page = Path(out["html"]).read_text()
    assert page.count(IMG) == N_FIGURES  # the Fig. 3 plots are drawn without their crops
    assert any("Crops are not shown" in n and "crops.parquet" in n for n in out["notes"])
    assert any("No annotations known" in n for n in out["notes"])
    assert "Crops are not shown" in page and "No annotations known" in page
    again = render_report(run, str(tmp_path / "out2"), annotations_uri=str(tmp_path / "in" / "annotations.csv"))
    assert "Bone cortex interruption" in Path(again["html"]).read_text()
    assert not any("annotations" in n.lower() for n in again["notes"])


@pytest.mark.slow
def test_scores_folder_with_labels(tmp_path):
    oof, _ = example_slices(n_patients=20, seed=3)
    classes = ("benign", "malignant")
    model = {"model_id": "abc123", "n_models": 3}
    rows = [
        score.patient_row(
            pid,
            [{**r, "series_instance_uid": "1.2.3", "vertebra": "L1"} for r in g.to_dict("records")],
            model,
            0.5,
            classes,
        )
        for pid, g in oof.groupby("patient_id")
    ]
    rows[0]["label"] = None  # an unlabelled patient is scored but not evaluated
    table = pa.Table.from_pylist(rows, schema=contracts.scores_schema())
    folder = str(tmp_path / "scores")
    storage.write_table(table, storage.join(folder, "scores.parquet"),
                        metadata={"vfx_ray.config": json.dumps({"threshold": 0.5, "classes": list(classes)})})
    labelled = table.filter(pc.is_valid(table["label"]))
    storage.write_text(storage.join(folder, "metrics.json"), json.dumps(score.label_metrics(labelled, 0.5, classes)))
    run = load_run(folder)
    assert run.kind == "scores" and run.folds == [] and run.patients["patient_id"].nunique() == 19
    out = render_report(folder, str(tmp_path / "out"))
    page = Path(out["html"]).read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    assert page.count(IMG) == len(out["figures"]) >= 4 + 4
    assert "fold mean" not in page and any("no label" in n for n in out["notes"])


@pytest.mark.slow
def test_report_of_a_run_on_s3(objectstore_server, tmp_path):
    root = f"s3://test/report-{uuid.uuid4().hex[:8]}"
    run = write_example_run(root, n_patients=24)
    out = render_report(run, str(tmp_path / "out"))
    assert len(out["notes"]) == 1 and out["notes"][0].startswith(NO_MODELS)  # crops, manifest, annotations from S3
    page = Path(out["html"]).read_text()
    assert page.count(IMG) == N_FIGURES and f"{root}/crops/crops.parquet" in page


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *extra, url],
        capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_a_real_browser_opens_the_page_without_errors(rendered, tmp_path):
    url = Path(rendered[1]["html"]).as_uri()
    dom = _chromium(tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not CONSOLE_ERRORS.search(dom.stderr), CONSOLE_ERRORS.search(dom.stderr)
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in dom.stdout
    assert dom.stdout.count(IMG) == N_FIGURES
    shot = tmp_path / "page.png"
    res = _chromium(tmp_path, url, "--hide-scrollbars", "--window-size=1200,3000", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.stat().st_size > 50_000  # text, tables and the first figures drawn
    # the console check can fail: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>not_defined_anywhere();</script></body></html>")
    assert CONSOLE_ERRORS.search(_chromium(tmp_path, bad.as_uri(), "--dump-dom").stderr)


@pytest.mark.slow
def test_report_of_a_real_tiny_train_cv_run(ray_session, tmp_path):
    import pyarrow.parquet as pq
    from crops_fixture import make_crops

    from vfx_ray.config import TrainConfig
    from vfx_ray.stages import train_cv

    crops_dir = tmp_path / "crops"
    crops_dir.mkdir()
    crops = make_crops(n_patients=16, slices=3, size=64)
    pq.write_table(crops, crops_dir / "crops.parquet")
    labels = pd.DataFrame(
        {"patient_id": crops["patient_id"].to_pylist(), "label": crops["label"].to_pylist()}
    ).drop_duplicates()
    ann = labels.assign(
        label=labels["label"].map({0: "benign", 1: "malignant"}),
        age=np.arange(len(labels)) + 50,
        sex=["M", "F"] * (len(labels) // 2),
        soft_tissue_mass=labels["label"],
        bone_destruction=labels["label"],
    )
    ann.to_csv(tmp_path / "annotations.csv", index=False)
    (crops_dir / "manifest.json").write_text(json.dumps({"annotations": str(tmp_path / "annotations.csv")}))
    cfg = TrainConfig(arch="resnet18", pretrained="none", n_folds=2, max_epochs=1, augment_factor=1, batch_size=16)
    run = str(tmp_path / "run")
    train_cv.run_train_cv(str(crops_dir / "crops.parquet"), run, cfg)
    out = render_report(run, str(tmp_path / "out"))
    page = Path(out["html"]).read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    assert page.count(IMG) == len(out["figures"]) >= 4 + 1
    assert not any("Crops are not shown" in n or "annotations" in n.lower() for n in out["notes"])
    assert not any("Grad-CAM" in n for n in out["notes"]) and "with Grad-CAM" in page  # the fold models' heatmaps
    assert "Paravertebral soft tissue mass" in page
