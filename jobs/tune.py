"""`ray job submit --working-dir . -- python jobs/tune.py --crops URI --out URI [--num-samples N] [--resume]`

plus `--nested` and the other flags of `vfx-ray tune`."""

import sys

from vfx_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
