"""Data layer: read -> normalise -> template + mask -> (cache) -> split -> pack -> shard -> collate.

One module a stage: readers.py, formats.py, template.py, tokenize.py, cache.py (the token
store, read) and build.py (building it), split.py, packing.py, sampler.py, collate.py;
pipeline.py drives them (``prepare``). The names callers use are
re-exported here: ``from dsft.data import prepare, Splits``.
"""

from dsft.data.formats import Example, load_examples
from dsft.data.pipeline import Corpus, Examples, Split, Splits, build_options, prepare
from dsft.data.tokenize import Tokenized
from dsft.errors import DataError

__all__ = [
    "Corpus",
    "DataError",
    "Example",
    "Examples",
    "Split",
    "Splits",
    "Tokenized",
    "build_options",
    "load_examples",
    "prepare",
]
