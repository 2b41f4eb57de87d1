"""The embedded PACS (``vfx-ray pacs``): a real Orthanc on loopback, with its secrets kept off
command lines, DICOMweb behind a password, and "stopped" judged by its port closing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import requests

from vfx_ray.services import orthanc

VFX = [sys.executable, "-m", "vfx_ray.cli"]
pytestmark = pytest.mark.skipif(not orthanc.available(), reason="Orthanc is not installed (make test installs it)")


def parse_exports(text: str) -> dict[str, str]:
    return dict(line[len("export "):].split("=", 1) for line in text.splitlines() if line.startswith("export "))


def test_cli_start_env_stop_round_trip(tmp_path):
    env = {**os.environ, "VFX_RAY_HOME": str(tmp_path / "home")}
    started = subprocess.run([*VFX, "pacs", "start", "--root", str(tmp_path / "pacs")], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
    exports = parse_exports(started.stdout)
    url, user, password = (exports[v] for v in (orthanc.URL_VAR, orthanc.USER_VAR, orthanc.PASSWORD_VAR))
    state = tmp_path / "home" / "pacs.json"
    port = json.loads(state.read_text())["port"]
    http = f"http://127.0.0.1:{port}"
    try:
        assert url == f"dicomweb+{http}/dicom-web" and len(password) >= 32
        assert oct(state.stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_path / "pacs" / "orthanc.json").stat().st_mode & 0o777) == "0o600"  # holds the password
        pid = json.loads(state.read_text())["pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert password.encode() not in f.read()
        assert requests.get(f"{http}/dicom-web/studies", timeout=10).status_code == 401
        assert requests.get(f"{http}/dicom-web/studies", auth=(user, password), timeout=10).json() == []
        config = json.loads((tmp_path / "pacs" / "orthanc.json").read_text())
        assert config["RemoteAccessAllowed"] is False and config["DicomServerEnabled"] is False
        with socket.socket() as s:  # the DICOM port stays closed
            assert s.connect_ex(("127.0.0.1", config["DicomPort"])) != 0
        again = subprocess.run([*VFX, "pacs", "env"], env=env, capture_output=True, text=True, check=True)
        assert parse_exports(again.stdout) == exports
        second = subprocess.run([*VFX, "pacs", "start", "--root", str(tmp_path / "p2")], env=env,
                                capture_output=True, text=True)
        assert second.returncode == 2 and "already runs" in second.stderr and "Traceback" not in second.stderr
    finally:
        stopped = subprocess.run([*VFX, "pacs", "stop"], env=env, capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not state.exists()
    gone = subprocess.run([*VFX, "pacs", "stop"], env=env, capture_output=True, text=True)
    assert gone.returncode == 2 and "no embedded PACS is running" in gone.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--key-images"], "--key-images needs --sr-out"),
    (["--sr-out", "dicomweb+http://u:secret@127.0.0.1:1/dicom-web"], "not the URI"),
])
def test_wrong_report_target_is_one_line_before_any_work(extra, message, tmp_path):
    argv = ["score", "--archive", str(tmp_path), "--annotations", "a.csv", "--model", "m.pt", "--out", "o", *extra]
    res = subprocess.run([*VFX, *argv], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "secret" not in res.stderr
