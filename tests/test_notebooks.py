"""The notebooks are stored without outputs and run top to bottom on tiny inputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install nbformat nbclient ipykernel")
nbclient = pytest.importorskip("nbclient", reason="pip install nbformat nbclient ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_cohort_and_crops.ipynb", "02_cv_results.ipynb")


def _stream(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _outputs(nb, kind: str) -> list[str]:
    return [o["data"][kind] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if kind in o.get("data", {})]


def _execute(name: str, tmp_path: Path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # kernel "python3" is ipykernel's own, run by this interpreter (the venv); nothing registered
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "os.environ" in code[0].source  # parameters come first


@pytest.mark.slow
def test_cohort_notebook_runs_on_a_generated_cohort(tmp_path, monkeypatch):
    for var in ("VFX_COHORT", "VFX_PATIENT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VFX_MATRIX", "96")
    nb = _execute(NAMES[0], tmp_path)
    assert len(_outputs(nb, "image/png")) == 3  # axial, sagittal, crops
    text = _stream(nb)
    assert "generated a 2-patient synthetic cohort" in text and "malignant" in text
    assert "(3, 64, 64)" in "".join(_outputs(nb, "text/plain"))


@pytest.mark.slow
def test_results_notebook_runs_on_a_given_run(tmp_path, monkeypatch):
    from vfx_ray.report.example_run import write_example_run

    run = write_example_run(str(tmp_path / "example"), n_patients=20, n_folds=2)
    monkeypatch.setenv("VFX_RUN", run)
    monkeypatch.setenv("VFX_REPORT_OUT", str(tmp_path / "report"))
    for var in ("VFX_CROPS", "VFX_ANNOTATIONS"):
        monkeypatch.delenv(var, raising=False)
    nb = _execute(NAMES[1], tmp_path)
    assert len(_outputs(nb, "image/png")) == 3 + 4  # ROC, calibration, decision curve + one per outcome
    tables = "".join(_outputs(nb, "text/html"))
    assert "Per patient" in tables and "ROC AUC" in tables and "95 % CI" in tables and "Bone destruction" in tables
    crops = re.search(r"- (\d+) crops found", _stream(nb))
    assert crops and int(crops.group(1)) >= 4 * 3  # every example's slices (3-5 each) have a crop
    assert (tmp_path / "report" / "report.html").is_file()
