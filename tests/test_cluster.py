"""cluster.yaml against Ray's own cluster-config schema and checks, and docs/cluster.md's
commands against the CLI they call."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from vfx_ray.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
# vCPU and GPUs of the instance types the config may use (AWS instance type pages)
INSTANCES = {"m6i.2xlarge": (8, 0), "c6i.4xlarge": (16, 0), "g5.xlarge": (4, 1), "p3.2xlarge": (8, 1)}
GPU_FAMILIES = ("g4dn.", "g5.", "g6.", "p3.", "p4d.", "p5.")


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_config_passes_rays_schema_and_checks(config):
    jsonschema.validate(config, SCHEMA)
    prepared = prepare_config(copy.deepcopy(config))  # Ray's defaults merged, as `ray up` does
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    with pytest.raises(jsonschema.ValidationError):  # the schema check can fail
        jsonschema.validate({**config, "available_node_types": {"x": {"node_config": {}}}}, SCHEMA)


def test_node_types_and_resources(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only: no tasks scheduled on the head
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for name, t in types.items() if name != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and len(cpu) == 1
    assert gpu[0]["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    assert gpu[0]["max_workers"] * gpu[0]["resources"]["GPU"] >= 10  # the 10 folds side by side
    assert cpu[0]["resources"]["CPU"] >= 8
    for name, t in types.items():
        vcpu, gpus = INSTANCES[t["node_config"]["InstanceType"]]
        assert t["resources"].get("CPU", vcpu) <= vcpu and t["resources"].get("GPU", 0) == (gpus if name != "head" else 0)
        assert t["node_config"]["IamInstanceProfile"]["Name"].startswith("vfx-ray-")  # S3 via instance profiles
        assert t["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:"))
        assert t.get("min_workers", 0) <= t.get("max_workers", 0)
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"])


def test_images_setup_and_start_commands(config):
    docker = config["docker"]
    types = config["available_node_types"]
    for image in (docker["image"], docker["head_image"], docker["worker_image"]):
        assert image.startswith("rayproject/ray:2.60.") and "-py311" in image
    gpu_name = next(n for n, t in types.items() if t["resources"].get("GPU"))
    cpu_name = next(n for n, t in types.items() if n not in (gpu_name, config["head_node_type"]))
    assert docker["worker_image"].endswith("-gpu") and "docker" not in types[gpu_name]
    assert not types[cpu_name]["docker"]["worker_image"].endswith("-gpu") and not docker["head_image"].endswith("-gpu")
    mount = config["file_mounts"]["/home/ray/vfx_ray"]
    assert (REPO / mount / "pyproject.toml").is_file()  # `ray up` from the repo root ships this project
    assert ".venv" in config["rsync_exclude"]
    assert any(c.strip().endswith("pip install --quiet -e /home/ray/vfx_ray") for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head and "--dashboard-host=0.0.0.0" in head and "--head" in head
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in cmds)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def _job_commands(doc: str) -> list[list[str]]:
    """`python jobs/<name>.py ARGS` of the docs, line continuations joined, $DATA filled in."""
    text = doc.replace("\\\n", " ").replace("$DATA", "s3://bucket")
    return [shlex.split(m) for m in re.findall(r"python (jobs/\w+\.py[^\n`]*)", text)]


def test_docs_cover_the_cluster_workflow_and_their_job_commands_parse():
    doc = (REPO / "docs" / "cluster.md").read_text()
    for needed in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job submit", "RAY_AUTH_MODE=token",
                   "~/.ray/auth_token", "RAY_AUTH_TOKEN", "ray get-auth-token --generate", "433 × 4",
                   "31,180 × 100", "GPU-hours"):
        assert needed in doc, needed
    jobs = _job_commands(doc)
    assert {j[0] for j in jobs} == {"jobs/crops.py", "jobs/tune.py", "jobs/train_cv.py", "jobs/score.py"}
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)
    checked = set()
    for job, *args in jobs:
        sub = Path(job).stem.replace("_", "-")
        if (REPO / job).is_file():  # each job script forwards to the subcommand of its name
            assert f'main(["{sub}", *sys.argv[1:]])' in (REPO / job).read_text()
        if sub in known:
            parser.parse_args([sub, *args])  # SystemExit on an unknown or missing flag
            checked.add(sub)
    assert {"crops", "train-cv", "score"} <= checked
