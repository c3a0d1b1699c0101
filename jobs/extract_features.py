"""Entry point for `ray job submit`: extract features on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/extract_features.py --config configs/resnet50.yaml

Inside a Ray job, RAY_ADDRESS points at the cluster, so ray.init() joins it instead of starting a
local one; `run.address` in the config overrides that.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when not pip-installed

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
