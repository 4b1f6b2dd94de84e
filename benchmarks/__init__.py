"""Benchmarks of dsft against its peers; not part of the installed package (see docs/benchmarks.md)."""
