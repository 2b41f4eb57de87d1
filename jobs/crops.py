"""`ray job submit --working-dir . -- python jobs/crops.py --archive ... --annotations ... --out ...`"""

import sys

from vfx_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["crops", *sys.argv[1:]]))
