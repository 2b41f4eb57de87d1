"""The documented jobs on a 3-node cluster shaped like cluster.yaml's: a head with no CPUs that
advertises the drivers' resource, and two worker nodes with their own temp dirs, for which a
"node-local" folder of the head is an empty disk of their own. Everything goes through
`ray job submit` and s3://."""

from __future__ import annotations

import json
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from ray_nodes import Cluster, local_cluster, run_job

from vfx_ray import storage
from vfx_ray.config import EASY, SynthConfig
from vfx_ray.synth.cohort import generate_cohort

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# Run as a job: the driver writes a file under the node-local folder (argv[1]), a task on each
# worker node looks for it.
SEES_HEAD_FILES = """
import json, os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
path = os.path.join(sys.argv[1], "written-by-driver")
open(path, "w").write("x")
head = ray.get_runtime_context().get_node_id()
workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]
seen = ray.get([ray.remote(num_cpus=1)(os.path.exists).options(
    scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(path) for n in workers])
print("RESULT", json.dumps({"driver_sees": os.path.exists(path), "workers_see": seen}))
"""


@pytest.fixture(scope="module")
def three_nodes(objectstore_server, tmp_path_factory) -> Iterator[tuple[Cluster, Path]]:
    """The cluster and its node-local folder, one for the module's tests (starting one costs a
    minute). After the store: the nodes inherit its variables."""
    root = tmp_path_factory.mktemp("three-nodes")
    local = root / "node-local"
    local.mkdir()
    with local_cluster(root, head_cpus=0, worker_cpus=[1, 1], driver_resource=True, node_local=local) as cluster:
        yield cluster, local


def _result(job: dict) -> dict:
    line = next(x for x in job["logs"].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _placements(cluster: Cluster) -> dict:
    """Node ids of the head, the Tune trial drivers (train-cv folds, tune trials) and the Ray
    Data tasks, from the cluster's state API."""
    def listing(kind: str) -> list[dict]:
        res = cluster.ray(
            "list", kind, "--address", cluster.gcs_address, "--detail", "--format", "json", "--limit", "10000"
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    head = next(n["node_id"] for n in listing("nodes") if n["is_head_node"])
    drivers = {a["node_id"] for a in listing("actors") if "ImplicitFunc" in (a.get("class_name") or "")}
    decode = {t["node_id"] for t in listing("tasks") if "MapBatches" in (t.get("name") or "") and t.get("node_id")}
    return {"head": head, "drivers": drivers, "decode": decode}


@pytest.mark.slow
def test_crops_tune_train_cv_and_score_as_jobs_on_three_nodes(objectstore_server, three_nodes, tmp_path):
    data = f"s3://test/cluster-{uuid.uuid4().hex[:8]}"
    cohort = SynthConfig(patients=10, matrix=128, seed=5, difficulty=EASY)
    generate_cohort(f"{data}/cohort", cohort, workers=1, progress=False)
    weights = tmp_path / "resnet18-standin.pth"  # no ImageNet download here: a stand-in state dict
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    train = ["--profile", "demo", "--arch", "resnet18", "--pretrained", "imagenet", "--epochs", "1",
             "--augment-factor", "1", "--pretrained-path", f"{data}/weights/resnet18-standin.pth"]
    jobs = {
        "weights": [
            str(Path(PY).parent / "vfx-ray"),
            "weights",
            "put",
            "--arch",
            "resnet18",
            "--from",
            str(weights),
            "--to",
            f"{data}/weights/",
        ],
        "crops": [
            PY,
            "jobs/crops.py",
            "--archive",
            f"{data}/cohort/dicom",
            "--annotations",
            f"{data}/cohort/annotations.csv",
            "--out",
            f"{data}/crops",
            "--quiet",
        ],
        "tune": [
            PY,
            "jobs/tune.py",
            "--crops",
            f"{data}/crops/crops.parquet",
            "--out",
            f"{data}/tune",
            "--num-samples",
            "2",
            *train,
            "--quiet",
        ],
        "train-cv": [
            PY,
            "jobs/train_cv.py",
            "--crops",
            f"{data}/crops/crops.parquet",
            "--out",
            f"{data}/run",
            "--folds",
            "2",
            "--params",
            f"{data}/tune/best_params.json",
            *train,
        ],
        "score": [
            PY,
            "jobs/score.py",
            "--archive",
            f"{data}/cohort/dicom",
            "--annotations",
            f"{data}/cohort/annotations.csv",
            "--model",
            f"{data}/run",
            "--out",
            f"{data}/scores",
            "--quiet",
        ],
    }
    import subprocess

    put = subprocess.run(jobs.pop("weights"), capture_output=True, text=True, cwd=REPO)
    assert put.returncode == 0 and "--pretrained-path" in put.stdout, put.stderr
    cluster, node_local = three_nodes
    rig = run_job(cluster, [PY, "-c", SEES_HEAD_FILES, str(node_local)], REPO, timeout=180)
    assert rig["status"] == "SUCCEEDED", rig["logs"][-3000:]
    # a local --out would really break here: the workers do not see what the driver writes
    assert _result(rig) == {"driver_sees": True, "workers_see": [False, False]}
    logs = {}
    for name, entry in jobs.items():
        job = run_job(cluster, entry, REPO, timeout=900)
        assert job["status"] == "SUCCEEDED", f"{name}: {job['message']}\n{job['logs'][-4000:]}"
        logs[name] = job["logs"]
    where = _placements(cluster)
    # a readable console: a line per fold and the metrics, none of Ray's INFO logs or worker lines
    lines = [x for x in logs["train-cv"].splitlines() if x.strip()]
    ours = [x for x in lines if "job_manager.py" not in x and not x.startswith("Running entrypoint")]
    assert not [x for x in ours if "INFO" in x or "(RayTrainWorker" in x or "pid=" in x], ours
    assert sum(x.startswith("fold ") and " epochs, best epoch " in x for x in lines) == 2, lines
    assert len([x for x in ours if "train-cv: epochs" not in x]) <= 6, ours
    assert where["drivers"] == {where["head"]}, "fold/trial drivers ran off the head node"
    assert len(where["decode"] - {where["head"]}) == 2, "decoding did not spread over both workers"
    assert len(storage.read_table(f"{data}/tune/trials.parquet")) == 2
    assert json.loads(storage.read_text(f"{data}/run/metrics.json"))["pooled"]["per_patient"]["n"] == 10
    assert storage.read_table(f"{data}/scores/scores.parquet").num_rows == 10


@pytest.mark.slow
def test_a_local_out_is_refused_at_submit_in_seconds(objectstore_server, three_nodes):
    cluster, node_local = three_nodes
    out = node_local / "run"
    command = shlex.join([PY, "jobs/train_cv.py", "--crops", "s3://test/any/crops.parquet", "--out",
                          str(out), "--profile", "demo"])
    timed = f"t0=$(date +%s%N); {command}; rc=$?; echo ELAPSED_MS $(( ($(date +%s%N) - t0) / 1000000 )); exit $rc"
    job = run_job(cluster, ["bash", "-c", timed], REPO, timeout=120)
    assert job["status"] == "FAILED" and "exit code 2" in job["message"], job["message"]
    lines = job["logs"].splitlines()
    assert [x for x in lines if "error" in x.lower()] == [
        f"vfx-ray train-cv: error: --out {out} is a local path, but this is a 3-node cluster whose "
        f"other nodes cannot see it: use s3://BUCKET/... (or --shared-fs MOUNT if every node mounts {out})"
    ], job["logs"][-3000:]
    seconds = int(next(x for x in lines if x.startswith("ELAPSED_MS")).split()[1]) / 1000  # the command's own
    assert seconds < 5, f"the refusal took {seconds:.1f} s"
