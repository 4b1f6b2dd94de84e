"""``python -m benchmarks [options]`` from a checkout = ``dsft bench [options]``."""

import sys

from benchmarks.vs_trl import main

sys.exit(main())
