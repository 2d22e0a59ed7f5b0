"""Benchmarks that write benchmarks/RESULTS.md; run each from the repository root as ``python -m benchmarks.<name>``."""
