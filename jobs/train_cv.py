"""`ray job submit --working-dir . -- python jobs/train_cv.py --crops URI --out URI [--profile demo]`"""

import sys

from vfx_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-cv", *sys.argv[1:]]))
