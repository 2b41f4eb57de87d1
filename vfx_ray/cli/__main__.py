"""``python -m vfx_ray.cli``: the same as the ``vfx-ray`` console script."""

import os
import sys

from vfx_ray.cli.app import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
