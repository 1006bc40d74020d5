"""Benchmark scripts; each writes its section of docs/benchmarks.md."""
