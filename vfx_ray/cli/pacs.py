"""`vfx-ray pacs`: the embedded PACS (Orthanc with DICOMweb) on loopback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vfx_ray.cli.common import CliError, positive_int


def cmd_pacs(args: argparse.Namespace) -> int:
    from vfx_ray.services import orthanc

    if args.action == "start":
        current = orthanc.load_state()
        if current and current.listening():
            raise CliError(f"an embedded PACS already runs at {current.url}; `vfx-ray pacs stop` first")
        if not orthanc.available():
            raise CliError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (make does, as root)")
        root = Path(args.root).absolute()
        server = orthanc.start(root, port=args.port, log_file=root.parent / "orthanc.log", detach=True)
        orthanc.save_state(server)
        print(orthanc.shell_exports(server))
        print(f"# Orthanc on {server.url} (DICOMweb {server.dicomweb_uri}, Explorer {server.explorer}, user "
              f"{server.user}); eval this output to use it, `vfx-ray pacs stop` to end it", file=sys.stderr)
        return 0
    server = orthanc.load_state()
    if server is None or not server.listening():
        raise CliError("no embedded PACS is running (start one with `vfx-ray pacs start`)")
    if args.action == "env":
        print(orthanc.shell_exports(server))
    else:  # stop
        server.stop()
        orthanc.STATE_FILE.unlink(missing_ok=True)
        print(f"stopped the embedded PACS at {server.url}", file=sys.stderr)
    return 0


def add_pacs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pacs",
        help="start/stop the embedded PACS (Orthanc with DICOMweb on loopback)",
        description=(
            "The embedded PACS: Debian's Orthanc with its DICOMweb plugin over a local folder, on a "
            "free loopback port with generated credentials (HTTP answers loopback only; its DICOM "
            "port is off). `start` prints shell exports of VFX_RAY_DICOMWEB_URL/_USER/_PASSWORD: "
            "eval \"$(vfx-ray pacs start --root ./pacs)\", then `score --sr-out \"$VFX_RAY_DICOMWEB_URL\"` "
            "or `--archive \"$VFX_RAY_DICOMWEB_URL\"`. Log in to Orthanc Explorer with the printed user "
            "and the password from `vfx-ray pacs env`."
        ),
    )
    p.add_argument("action", choices=["start", "stop", "env"])
    p.add_argument("--root", default="out/pacs", help="folder of Orthanc's storage and configuration")
    p.add_argument("--port", type=positive_int, help="HTTP port (default: a free one)")
    p.set_defaults(func=cmd_pacs)

