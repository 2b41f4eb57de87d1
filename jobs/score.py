"""`ray job submit --working-dir . -- python jobs/score.py --archive ... --annotations ... --model ... --out ...`"""

import sys

from vfx_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
