"""Benchmarks: ``python -m bench.<name>``; each compares raylane with the bare engine in one run."""
