"""`python -m pipeline.cli`: the featurize command."""

import sys

from pipeline.cli import main

sys.exit(main())
