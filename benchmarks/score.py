"""Scoring from an S3 archive: the Ray Data pipeline vs a plain loop and vs the model alone.

Same archive, same model (ResNet50 by default, random weights: speed does not depend on
them), measured in one run:
  pipeline    `score.run_score` (index, decode, crops, model actors, per-patient max)
  plain loop  one process: pydicom per file, same crops, eager torch per patient
  model only  forward passes on the crops already in memory (the upper bound)
Then the pipeline on a second archive size, for the per-patient cost; and, both as whole
processes (start-up included), `vfx-ray score` on the S3 archive against the serial tool a
user would write: SimpleITK crops + the model, one process, on a local folder of the same
archive (benchmarks/sitk_loop.py with a model).

    .venv/bin/python benchmarks/score.py --patients 50 --large 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cohorts_in_s3, local_folder, plain_patients


def whole_processes(cohort: str, model_uri: str) -> dict[str, float]:
    """Seconds of `vfx-ray score` and of the SimpleITK + model loop, each a fresh process."""
    local = local_folder(cohort)
    t = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).parent / "sitk_loop.py"), f"{local}/dicom",
                    f"{local}/annotations.csv", model_uri], check=True, capture_output=True)
    loop_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vfx_ray.cli", "score", "--archive", f"{cohort}/dicom", "--annotations",
                    f"{cohort}/annotations.csv", "--model", model_uri, "--out", tempfile.mkdtemp(prefix="bench-score-"),
                    "--quiet"], check=True, capture_output=True)
    cli_s = time.perf_counter() - t
    return {"sitk_loop_with_model_process_s": round(loop_s, 1), "vfx_score_process_s": round(cli_s, 1),
            "vfx_score_vs_sitk_loop": round(loop_s / cli_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=50)
    ap.add_argument("--large", type=int, default=200, help="second archive size (0: skip)")
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--arch", default="resnet50")
    args = ap.parse_args()

    import ray

    from vfx_ray.ml.model import build_model, predict_proba, save_model
    from vfx_ray.stages.score import run_score

    torch.manual_seed(0)
    net = build_model(args.arch, pretrained="none").eval()
    model_uri = f"{tempfile.mkdtemp(prefix='bench-model-')}/model.pt"
    save_model(net, model_uri, args.arch)
    sizes = [args.patients] + ([args.large] if args.large else [])
    with cohorts_in_s3(sizes, args.matrix) as cohorts:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

        def pipeline(n: int, tag: str) -> float:
            c = cohorts[n]
            t = time.perf_counter()
            s = run_score(f"{c}/dicom", f"{c}/annotations.csv", model_uri, f"s3://vfx/scores-{tag}-{n}", progress=False)
            assert s["rows"] == n, s
            return time.perf_counter() - t

        pipeline(args.patients, "warmup")
        ray_s = pipeline(args.patients, "timed")
        large_s = pipeline(args.large, "timed") if args.large else None
        ray.shutdown()

        c = cohorts[args.patients]
        t = time.perf_counter()
        all_crops = []
        for _, crops in plain_patients(f"{c}/dicom", f"{c}/annotations.csv"):
            x = np.stack([k["image"] for k in crops])
            predict_proba(net, x).max()
            all_crops.append(x)
        loop_s = time.perf_counter() - t

        x = np.concatenate(all_crops)
        t = time.perf_counter()
        predict_proba(net, torch.from_numpy(x).contiguous(memory_format=torch.channels_last), batch_size=64)
        model_s = time.perf_counter() - t
        whole = whole_processes(c, model_uri)

    n = args.patients
    result = {
        "arch": args.arch,
        "patients": n,
        "crops": int(len(x)),
        "torch_threads": torch.get_num_threads(),
        "pipeline_patients_per_s": round(n / ray_s, 2),
        "plain_loop_patients_per_s": round(n / loop_s, 2),
        "model_only_patients_per_s": round(n / model_s, 2),
        "pipeline_vs_loop": round(loop_s / ray_s, 2),
        "pipeline_vs_model_only": round(model_s / ray_s, 2),
    }
    result.update(whole)
    if large_s:
        result[f"pipeline_s_per_patient_{n}"] = round(ray_s / n, 3)
        result[f"pipeline_s_per_patient_{args.large}"] = round(large_s / args.large, 3)
        result["per_patient_cost_ratio_large_vs_small"] = round((large_s / args.large) / (ray_s / n), 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
