"""`vfx-ray objectstore` and `vfx-ray pacs`: the embedded services the demo and the tests use.

Each starts a real server on loopback with generated credentials and prints shell exports of
the variables clients read; ``env`` prints them again, ``stop`` ends it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vfx_ray.cli.common import CliError, positive_int


def cmd_objectstore(args: argparse.Namespace) -> int:
    from vfx_ray.services import object_store

    if args.action == "start":
        current = object_store.load_state()
        if current and current.running():
            raise CliError(
                f"an embedded store already runs at {current.endpoint} (pid {current.pid}); "
                "`vfx-ray objectstore stop` first"
            )
        store = object_store.start(
            args.root,
            port=args.port,
            buckets=tuple(args.bucket),
            log_file=Path(args.root).absolute().parent / "rclone.log",
            detach=True,
        )
        object_store.save_state(store)
        print(object_store.shell_exports(store))
        print(
            f"# rclone S3 server on {store.endpoint} serving {store.root} (pid {store.pid});"
            " eval this output to use it, `vfx-ray objectstore stop` to end it",
            file=sys.stderr,
        )
        return 0
    store = object_store.load_state()
    if store is None or not store.running():
        raise CliError("no embedded store is running (start one with `vfx-ray objectstore start`)")
    if args.action == "env":
        print(object_store.shell_exports(store))
    else:  # stop
        store.stop()
        object_store.STATE_FILE.unlink(missing_ok=True)
        print(f"stopped the embedded store at {store.endpoint}", file=sys.stderr)
    return 0



def add_objectstore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "objectstore",
        help="start/stop the embedded S3 server (rclone serve s3 on loopback)",
        description=(
            "The embedded object store: `rclone serve s3` over a local folder on a free loopback "
            "port with generated credentials. `start` prints shell exports of the standard AWS "
            "variables: eval \"$(vfx-ray objectstore start --root ./s3)\"."
        ),
    )
    p.add_argument("action", choices=["start", "stop", "env"])
    p.add_argument("--root", default="out/s3", help="folder served; its sub-folders are buckets")
    p.add_argument("--port", type=positive_int, help="port (default: a free one)")
    p.add_argument("--bucket", action="append", default=["vfx"], help="bucket to create (repeatable)")
    p.set_defaults(func=cmd_objectstore)


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
