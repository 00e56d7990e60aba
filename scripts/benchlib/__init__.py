"""Benchmark machinery for scripts/bench (see /work/shared/bench/README.md for the spec)."""
