"""The embedded PACS: Debian's Orthanc with its DICOMweb plugin, on loopback.

A real PACS so the tests and the demo push Structured Reports through the same STOW-RS and
read archives through the same QIDO-RS/WADO-RS as a hospital's. Orthanc 1.10 has no bind
address setting: both its ports would listen on every interface, so the DICOM server is off
(DICOMweb needs none) and ``RemoteAccessAllowed: false`` makes HTTP answer loopback only.
Credentials are generated and live in a 0600 config file and the state file, never on a
command line. Clients read them from ``VFX_RAY_DICOMWEB_USER``/``_PASSWORD``
(:mod:`vfx_ray.dicomweb`). A detached Orthanc may linger as a zombie here, so "stopped" is
judged by its port closing, not by ``kill(pid, 0)``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vfx_ray.services import object_store
from vfx_ray.services.object_store import free_port, wait_listening

STATE_FILE = Path(os.environ.get("VFX_RAY_HOME", Path.home() / ".vfx_ray")) / "pacs.json"
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web/"
URL_VAR, USER_VAR, PASSWORD_VAR = "VFX_RAY_DICOMWEB_URL", "VFX_RAY_DICOMWEB_USER", "VFX_RAY_DICOMWEB_PASSWORD"


def orthanc_binary() -> str:
    """Orthanc's executable (Debian ``orthanc``) once its DICOMweb plugin (``orthanc-dicomweb``) is there."""
    found = shutil.which("Orthanc") or (ORTHANC if Path(ORTHANC).exists() else None)
    if not found or not Path(DICOMWEB_PLUGIN).exists():
        raise RuntimeError("Orthanc or its DICOMweb plugin is missing: apt-get install orthanc orthanc-dicomweb")
    return found


def available() -> bool:
    try:
        orthanc_binary()
    except RuntimeError:
        return False
    return True


@dataclass
class Pacs:
    """A running (or stopped) Orthanc and how to reach it."""

    root: str
    port: int
    user: str
    password: str
    pid: int | None = None

    @property
    def url(self) -> str:
        """Orthanc's REST root (its Explorer is at ``/app/explorer.html``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_uri(self) -> str:
        """The URI ``--archive`` and ``--sr-out`` take: the DICOMweb root under our scheme."""
        return f"dicomweb+{self.url}{DICOMWEB_ROOT.rstrip('/')}"

    @property
    def explorer(self) -> str:
        return f"{self.url}/app/explorer.html"

    def env(self) -> dict[str, str]:
        return {URL_VAR: self.dicomweb_uri, USER_VAR: self.user, PASSWORD_VAR: self.password}

    def export(self) -> None:
        os.environ.update(self.env())

    def listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if the port stays open; done when the port is closed."""
        if self.pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except OSError:
                break
            deadline = time.monotonic() + timeout
            while self.listening() and time.monotonic() < deadline:
                try:  # reap it if it is our child
                    os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.05)
            if not self.listening():
                break
        self.pid = None


def config(root: Path, port: int, user: str, password: str) -> dict:
    """Orthanc's configuration: loopback HTTP with a password, no DICOM port, DICOMweb on."""
    return {
        "Name": "vfx_ray",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "DicomServerEnabled": False,
        "DicomPort": free_port(),  # unused (server off) but must not collide with a system Orthanc
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "OverwriteInstances": False,  # a re-sent SR with the same SOP Instance UID is kept once
        "StorageCompression": False,
        "HttpsVerifyPeers": False,
    }


def start(root: str | os.PathLike, port: int | None = None, log_file: str | os.PathLike | None = None,
          detach: bool = False) -> Pacs:
    """Start Orthanc over ``root`` (storage and config inside it) with fresh credentials."""
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    pacs = Pacs(str(root), port or free_port(), "vfx" + secrets.token_hex(4), secrets.token_hex(16))
    conf = root / "orthanc.json"
    conf.write_text(json.dumps(config(root, pacs.port, pacs.user, pacs.password), indent=2))
    conf.chmod(0o600)
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([orthanc_binary(), str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=detach)
    pacs.pid = proc.pid
    try:
        wait_listening(pacs.port)
    except TimeoutError:
        pacs.stop()
        raise TimeoutError(f"Orthanc did not listen on 127.0.0.1:{pacs.port}; see {log_file or 'its log'}") from None
    return pacs


def save_state(pacs: Pacs, path: Path = STATE_FILE) -> None:
    object_store.save_state(pacs, path)


def load_state(path: Path = STATE_FILE) -> Pacs | None:
    return object_store.load_state(path, Pacs)


def shell_exports(pacs: Pacs) -> str:
    return object_store.shell_exports(pacs)
