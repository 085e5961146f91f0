"""`python -m worker.cli`: the same as the `internvl-queue` command."""

import sys

from worker.cli import main

sys.exit(main())
