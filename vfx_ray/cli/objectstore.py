"""`vfx-ray objectstore`: the embedded S3 store (rclone) on loopback."""

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

