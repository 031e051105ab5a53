"""Measured, not asserted: ``python -m benchmarks`` runs each benchmark and writes
BENCHMARKS.md at the project root. ``--quick`` runs tiny sizes (the test suite does, so
the benchmarks never rot); real numbers are never asserted anywhere."""
