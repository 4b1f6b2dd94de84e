"""``python -m dsft.train CONFIG [overrides]`` (``torchrun ... -m dsft.train``) = ``dsft train``.

An entry point like ``__main__``, kept for launch lines written against it; the training
recipe itself is ``dsft/recipes/train.py``.
"""

import sys

from dsft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
