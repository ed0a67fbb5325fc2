"""Serving benchmarks (tools/bench_serving.py, `make bench`): workloads, the systems compared, and their metrics."""
