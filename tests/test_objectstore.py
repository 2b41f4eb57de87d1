"""The embedded store as users drive it: `vfx-ray objectstore start|env|stop`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import boto3
import pytest

VFX = [sys.executable, "-m", "vfx_ray.cli"]


def parse_exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            k, v = line[len("export ") :].split("=", 1)
            out[k] = v
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.slow
def test_cli_start_env_stop_round_trip(tmp_path):
    env = {**os.environ, "VFX_RAY_HOME": str(tmp_path / "home")}
    for k in list(env):
        if k.startswith("AWS_"):
            env.pop(k)
    root = tmp_path / "s3"
    started = subprocess.run(
        [*VFX, "objectstore", "start", "--root", str(root), "--bucket", "extra"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    exports = parse_exports(started.stdout)
    assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert len(exports["AWS_SECRET_ACCESS_KEY"]) >= 32
    assert (root / "vfx").is_dir() and (root / "extra").is_dir()
    state = (tmp_path / "home" / "objectstore.json")
    assert oct(state.stat().st_mode & 0o777) == "0o600"  # holds the secret
    pid = int(__import__("json").loads(state.read_text())["pid"])
    try:
        again = subprocess.run([*VFX, "objectstore", "env"], env=env, capture_output=True, text=True, check=True)
        assert parse_exports(again.stdout) == exports
        second = subprocess.run(
            [*VFX, "objectstore", "start", "--root", str(root)], env=env, capture_output=True, text=True
        )
        assert second.returncode == 2 and "already runs" in second.stderr
        assert "Traceback" not in second.stderr

        client = boto3.client(
            "s3",
            endpoint_url=exports["AWS_ENDPOINT_URL"],
            aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        client.put_object(Bucket="extra", Key="k/v.txt", Body=b"kept")
        assert (root / "extra" / "k" / "v.txt").read_bytes() == b"kept"
        assert [b["Name"] for b in client.list_buckets()["Buckets"]] == ["extra", "vfx"]
    finally:
        stopped = subprocess.run([*VFX, "objectstore", "stop"], env=env, capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)
    assert not state.exists()
    gone = subprocess.run([*VFX, "objectstore", "stop"], env=env, capture_output=True, text=True)
    assert gone.returncode == 2 and "no embedded store is running" in gone.stderr


def test_store_stops_cleanly_in_process(tmp_path):
    from vfx_ray.services import object_store

    store = object_store.start(tmp_path / "root")
    assert store.running()
    with open(f"/proc/{store.pid}/cmdline", "rb") as f:
        assert store.secret_key.encode() not in f.read()  # `ps` shows every user the command line
    store.stop()
    assert not store.running()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["synth", "--out", "x", "--patients", "0"], "expected a number > 0"),
        (["synth"], "the following arguments are required: --out"),
        (["nosuch"], "invalid choice"),
    ],
)
def test_wrong_cli_input_is_one_line(argv, message):
    res = subprocess.run([*VFX, *argv], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
