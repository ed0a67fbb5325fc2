"""Interim (issue 26): the benchmarks moved to the top-level bench/ (not shipped in the wheel); only the soak's
soak.py is still here, and moves last."""
