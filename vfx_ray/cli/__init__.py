"""The command line, rank 5: one module per command, argparse and input checks only; wrong input
is one line on stderr and exit 2, before any expensive work. May import every rank below.

``main`` is the console script's entry point (``vfx_ray.cli:main``, ``python -m vfx_ray.cli``);
it imports the parser lazily, so importing this package imports nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from vfx_ray.cli.app import main as run

    return run(argv)
