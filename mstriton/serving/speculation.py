"""Speculative decoding's settings: the decode model's parameters for n-gram drafting (engine/ngram.py), read
into what the scheduler runs with (serving/scheduler.py verifies the drafts)."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Speculation:
    """Speculative decoding by n-gram lookup (engine/ngram.py): up to `tokens` drafted tokens per sequence are
    verified in each decode step, while the step's rows (every sequence's own token, and the drafts) stay within
    `max_rows`: past that, verifying costs more than the tokens it saves (a big batch already reads each weight
    once for many tokens), so a big batch drafts nothing."""
    tokens: int = 8
    max_rows: int = 12
    ngram_max: int = 4
    ngram_min: int = 2

    # the decode model's config parameters, with what "speculative": "ngram" turns on by default. 8 tokens in 12 rows
    # measured better than 4 in 8 on SmolLM2 (benchmarks/speculative_k8.md against the k=4 run in
    # benchmarks/speculative_k4.md: rewrites 1.98x against 1.79x)
    PARAMETERS = {"speculative": "off", "num_speculative_tokens": "8", "speculative_max_rows": "12",
                  "ngram_max": "4", "ngram_min": "2"}

    @classmethod
    def from_parameters(cls, value: Callable[[str, str], str]) -> "Speculation | None":
        """From a decode model's parameters (`value(key, default)`); None when "speculative" is "off". A value
        out of range is a ValueError that names the parameter."""
        kind = value("speculative", "off")
        if kind == "off":
            return None
        if kind != "ngram":
            raise ValueError(f"parameter 'speculative' must be 'off' or 'ngram', got {kind!r}")
        numbers = {}
        for key, field, low in (("num_speculative_tokens", "tokens", 1), ("speculative_max_rows", "max_rows", 2),
                                ("ngram_max", "ngram_max", 1), ("ngram_min", "ngram_min", 1)):
            text = value(key, cls.PARAMETERS[key])
            if not text.isdigit() or int(text) < low:
                raise ValueError(f"parameter '{key}' must be an integer >= {low}, got {text!r}")
            numbers[field] = int(text)
        if numbers["ngram_min"] > numbers["ngram_max"]:
            raise ValueError("parameter 'ngram_min' must not exceed 'ngram_max'")
        return cls(**numbers)
