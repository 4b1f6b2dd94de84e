"""``python -m benchmarks [options]`` from a checkout = ``dsft bench [options]``."""

import sys

from benchmarks.bench import main

sys.exit(main())
