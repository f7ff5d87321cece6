"""Benchmarks and the bundled model's training code: not part of the installed package.

Run from the repository root as modules, e.g. ``python -m benchmarks.throughput`` (commands and
results: benchmarks/README.md). They import only synthgen's public API (``pipeline``, ``stages``)
and share :mod:`benchmarks.common`.
"""
