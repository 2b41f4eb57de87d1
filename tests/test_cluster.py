"""cluster.yaml against Ray's own cluster-config schema and checks, docker/Dockerfile against
this package, and the commands of docs/cluster.md and README.md against the CLI they call."""

from __future__ import annotations

import argparse
import copy
import json
import posixpath
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from vfx_ray.cli.app import build_parser

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
# vCPU and GPUs of the instance types the config may use (AWS instance type pages)
INSTANCES = {
    "m6i.2xlarge": (8, 0), "c6i.4xlarge": (16, 0),
    "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g6.4xlarge": (16, 1), "p3.2xlarge": (8, 1),
}
GPU_FAMILIES = ("g4dn.", "g5.", "g6.", "p3.", "p4d.", "p5.")
GPU_WORKER_CPUS = 2  # what a GPU training worker reserves besides its GPU (--gpu-worker-cpus default)
DRIVER_RESOURCE = "vfx_driver"
ECR_IMAGE = re.compile(r"^(ACCOUNT_ID|\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com/vfx-ray:\S+$")
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"


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
    # drivers only: no tasks on the head, and the fold/trial drivers' resource lives there alone
    assert head["resources"] == {"CPU": 0, DRIVER_RESOURCE: 1000}
    assert all(DRIVER_RESOURCE not in t["resources"] for n, t in types.items() if n != config["head_node_type"])
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for name, t in types.items() if name != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and len(cpu) == 1
    assert gpu[0]["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    assert gpu[0]["max_workers"] * gpu[0]["resources"]["GPU"] >= 10  # the 10 folds side by side
    # headroom: per GPU, the training worker's CPUs plus at least as many again for decoding
    assert gpu[0]["resources"]["CPU"] >= 2 * GPU_WORKER_CPUS * gpu[0]["resources"]["GPU"] + 4
    assert cpu[0]["resources"]["CPU"] >= 8
    for name, t in types.items():
        vcpu, gpus = INSTANCES[t["node_config"]["InstanceType"]]
        assert t["resources"].get("CPU", vcpu) <= vcpu and t["resources"].get("GPU", 0) == (
            gpus if name != "head" else 0
        )
        assert t["node_config"]["IamInstanceProfile"]["Name"].startswith("vfx-ray-")  # S3 via instance profiles
        assert t["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:"))
        assert t.get("min_workers", 0) <= t.get("max_workers", 0)
    assert config["max_workers"] >= sum(
        t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]
    )


def test_one_prebuilt_image_and_nothing_installed_at_boot(config):
    docker, types = config["docker"], config["available_node_types"]
    region = config["provider"]["region"]
    image = ECR_IMAGE.match(docker["image"])
    assert image and image["region"] == region, docker["image"]  # our image, pushed to the cluster's region
    assert not {"head_image", "worker_image"} & set(docker) and all("docker" not in t for t in types.values())
    registry = docker["image"].split("/")[0]
    login = " ".join(config["initialization_commands"])  # on the host, before the pull
    assert f"aws ecr get-login-password --region {region}" in login and f"--password-stdin {registry}" in login
    setup = " ".join(config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"])
    assert "pip install" not in setup and "ray.__version__.startswith('2.60')" in setup and "vfx_ray" in setup
    assert not any(dest.startswith("/home/ray/vfx_ray") for dest in config["file_mounts"])  # no repo sync
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_environment_of_every_node(config):
    region = config["provider"]["region"]
    assert f"--env AWS_REGION={region}" in config["docker"]["run_options"]  # every container, every node
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head and "--dashboard-host=0.0.0.0" in head and "--head" in head
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert len(start) == 1
        env = start[0].split("ray start")[0].split(";")[-1].split()  # VAR=value words just before it
        assert {"RAY_AUTH_MODE=token", "RAY_TRAIN_ENABLE_STATE_TRACKING=1"} <= set(env), start[0]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, comments dropped, continuations joined."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in joined.splitlines() if ln.strip()]


def test_dockerfile_installs_this_package():
    steps = _dockerfile()
    assert steps[0] == ("FROM", RAY_IMAGE)
    workdir, copied = "/", {}  # source in the repo -> where it lands in the image
    pip_targets = []
    for op, args in steps:
        if op == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        elif op == "COPY":
            *srcs, dest = [w for w in shlex.split(args) if not w.startswith("--")]
            dest = posixpath.join(workdir, dest)
            for src in srcs:  # a folder's contents go into dest; a file into dest/ or as dest
                name = src.rstrip("/")
                into = (REPO / name).is_file() and (dest.endswith("/") or len(srcs) > 1)
                copied[name] = posixpath.normpath(posixpath.join(dest, name) if into else dest)
        elif op == "RUN" and "pip install" in args:
            words = shlex.split(args.split("&&")[0])
            targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            pip_targets += [posixpath.normpath(posixpath.join(workdir, t)) for t in targets]
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    for needed in ("pyproject.toml", readme, "vfx_ray", "jobs"):
        assert needed in copied, f"the Dockerfile does not copy {needed}"
    project_dir = copied["pyproject.toml"].rsplit("/", 1)[0]
    assert copied["vfx_ray"] == f"{project_dir}/vfx_ray"  # the package sits beside its pyproject
    assert project_dir in pip_targets, (project_dir, pip_targets)  # `pip install` of this project
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"}
    assert {".venv", ".git", "out"} <= ignored and not ignored & set(copied)


# ---------------------------------------------------------------- documented commands
def _code_blocks(doc: str) -> str:
    return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", doc, re.S))


# `vfx-ray` in command position (line start, after `$(`, `--`, `;`, `&&`, `|`, or as .venv/bin/vfx-ray),
# not inside other words such as `--repository-name vfx-ray`; `python jobs/X.py` anywhere.
CMD = re.compile(r"(?:(?:^\s*|\$\(|\s--\s+|[;&|]\s*)(?:[\w.~/-]*/)?(vfx-ray)|(python jobs/(\w+)\.py))\s+([^\n`]*)")


def _commands(doc: str) -> list[tuple[str, list[str], list[str]]]:
    """(subcommand, args, flags in [optional parts]) of every `vfx-ray ...` and `python jobs/X.py
    ...` in the code blocks; continuations joined, $DATA filled in; a synopsis' [--flag VALUE]
    parts are taken out of args (their values are placeholders), and a|b reads as a."""
    text = _code_blocks(doc).replace("\\\n", " ").replace("$DATA", "s3://bucket")
    found = []
    for line in text.splitlines():
        for m in re.finditer(CMD, line):
            rest = re.split(r"\s#\s|\)", m[4])[0]  # up to a comment or the end of $( ... )
            optional = re.findall(r"\[(--[\w-]+)", rest)
            words = [w.split("|")[0] for w in shlex.split(re.sub(r"\[[^\]]*\]", " ", rest))]
            if m[3]:  # a job script: forwards to the subcommand of its name
                script = REPO / "jobs" / f"{m[3]}.py"
                sub = m[3].replace("_", "-")
                assert f'main(["{sub}", *sys.argv[1:]])' in script.read_text(), script
                found.append((sub, words, optional))
            elif words and words[0] != "COMMAND":
                found.append((words[0], words[1:], optional))
    return found


def _options(parser: argparse.ArgumentParser, words: list[str]) -> set[str]:
    """Option strings of the (sub-)subparser that ``words`` select, e.g. ["weights", "put"]."""
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return {o for a in parser._actions for o in a.option_strings}


def _parse_all(commands: list[tuple[str, list[str], list[str]]]) -> set[str]:
    parser = build_parser()
    for sub, args, optional in commands:
        try:
            parser.parse_args([sub, *args])
        except SystemExit as exc:  # argparse's own message went to stderr
            raise AssertionError(f"does not parse: vfx-ray {sub} {shlex.join(args)}") from exc
        unknown = set(optional) - _options(parser, [sub, *args])
        assert not unknown, f"vfx-ray {sub}: no such option {sorted(unknown)}"
    return {sub for sub, _, _ in commands}


def test_every_command_of_the_cluster_guide_parses():
    doc = (REPO / "docs" / "cluster.md").read_text()
    commands = _commands(doc)
    assert _parse_all(commands) >= {"weights", "crops", "tune", "train-cv", "score", "report"}
    jobs = [(sub, args) for sub, args, _ in commands if sub in ("crops", "tune", "train-cv", "score")]
    path_flags = ("--archive", "--annotations", "--crops", "--out", "--model", "--params", "--pretrained-path")
    for sub, args in jobs:  # on the AWS cluster every data path is in the bucket
        for flag, value in zip(args, args[1:], strict=False):
            if flag in path_flags:
                assert value.startswith("s3://"), (sub, flag, value)
        if sub in ("tune", "train-cv"):  # the paper profile needs the ImageNet weights
            assert "--pretrained-path" in args, sub
    assert any(sub == "weights" and args[0] == "put" and "--arch" in args for sub, args, _ in commands)


def test_cluster_guide_covers_the_workflow():
    doc = (REPO / "docs" / "cluster.md").read_text()
    for needed in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job submit", "RAY_AUTH_MODE=token",
                   "~/.ray/auth_token", "RAY_AUTH_TOKEN", "ray get-auth-token --generate", "433 × 4",
                   "31,180 × 100", "GPU-hours", "docker/Dockerfile", "docker push", "aws ecr",
                   "vfx-ray weights put", "--pretrained-path", "vfx_driver", "RAY_TRAIN_ENABLE_STATE_TRACKING",
                   "--shared-fs", "--max-concurrent", "--gpu-worker-cpus", "--checkpoint-every", "--no-gpu",
                   "--verbose", "VFX_RAY_DEBUG"):
        assert needed in doc, needed
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for name, t in config["available_node_types"].items():  # the node table matches the config
        row = next(ln for ln in doc.splitlines() if ln.startswith(f"| `{name}`"))
        assert t["node_config"]["InstanceType"] in row, row
        assert ", ".join(f"{k}: {v}" for k, v in t["resources"].items()) in row, row
    for stale in ("downloaded on first use", "request_resources", "pip install -e"):
        assert stale not in doc, stale


def test_every_command_of_the_readme_parses():
    commands = _commands((REPO / "README.md").read_text())
    assert _parse_all(commands) >= {"objectstore", "synth", "crops", "tune", "train-cv", "score", "report", "demo"}


def test_the_command_scanner_can_fail():
    with pytest.raises(AssertionError, match="does not parse"):
        _parse_all(_commands("```bash\nvfx-ray weights put --arch resnet50 --too s3://b/\n```\n"))
    with pytest.raises(AssertionError, match="no such option"):
        _parse_all(_commands("```\nvfx-ray weights put --arch resnet50 --to URI [--frm FILE]\n```\n"))
    doc = "```\nray job submit -- python jobs/score.py --out $DATA/x  # c\naws ecr x --name vfx-ray --region r\n```"
    assert _commands(doc) == [("score", ["--out", "s3://bucket/x"], [])]
    assert _options(build_parser(), ["weights", "put"]) >= {"--arch", "--to", "--from"}
