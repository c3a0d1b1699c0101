"""Entry point for `ray job submit`: train and evaluate a classifier on extracted features.

    ray job submit --working-dir . -- python jobs/train_classifier.py --config configs/train.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when not pip-installed

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
