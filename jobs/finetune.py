"""Entry point for `ray job submit`: fine-tune a network on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/finetune.py --config configs/finetune.yaml

Inside a Ray job, RAY_ADDRESS points at the cluster, so the training worker runs there; `run.address` in the
config overrides that. Interrupted (`ray job stop`), the same command resumes after the last finished epoch.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when not pip-installed

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
