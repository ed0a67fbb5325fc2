"""Interim (issue 26): the benchmark harness moved to the top-level bench/; the soak (mstriton/bench/soak.py and
tools/soak.py) moves last, and imports these names from here until then. Removed with it."""

from bench.harness.loops import run_clients  # noqa: F401
from bench.timing import RequestTiming, summarize  # noqa: F401
