"""benchmarks/gpu.py runs where only torch, torchvision and numpy exist (the borrowed GPU machine):
its --smoke run on the CPU, with Ray, pydicom and SimpleITK made unimportable in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "pydicom", "SimpleITK", "pandas")  # not on that machine (pandas: not promised)


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_without_ray_or_dicom_libraries(tmp_path):
    for name in BLOCKED:  # packages that shadow the real ones and fail on import, in every process
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not on the GPU machine')\n"
        )
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:.", "OUT": str(out)}
    probe = subprocess.run([sys.executable, "-c", "import ray"], cwd=REPO, env=env, capture_output=True, text=True)
    assert "is not on the GPU machine" in probe.stderr  # the blocker works
    run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    names = ["train reference fp32", "train resident", "packed K=1", "packed K=2",
             "score 2 models loop", "score 2 models vmap"]
    for name in names:
        assert name in run.stdout, name
        rate = result[name].get("images_per_s") or result[name].get("crops_per_s")
        assert rate and rate > 0, (name, result[name])
    one, two = result["packed K=1"]["per_fold"], result["packed K=2"]["per_fold"]
    assert [r["fold"] for r in two] == [0, 1]
    # packing does not change a fold: fold 0 after one pass is the same model, alone or beside fold 1
    assert one[0]["model_id_after_one_pass"] == two[0]["model_id_after_one_pass"] != two[1]["model_id_after_one_pass"]
    assert result["projection"]["images"] == 10 * 100 * 20 * result["plan"]["fold_crops"]
    assert result["projection"]["minutes"] > 0
