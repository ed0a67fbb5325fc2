"""Serving logic shared by the Triton models: scheduling, request parsing, metrics."""
