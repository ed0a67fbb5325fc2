"""Interim (issue 26): see mstriton/bench/timing.py. Removed when the soak moves to bench/."""

from bench.scenarios import word_stream  # noqa: F401
