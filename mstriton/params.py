"""Per-request generation parameters: names, defaults, allowed ranges, and their validation.

Names follow tensorrtllm_backend's ensemble inputs (so its clients and genai-perf work unchanged), with the older
and the MindSpore Serving / TGI spellings accepted as aliases. Every error names the field and its allowed range.
"""

from __future__ import annotations

import dataclasses


# Prompt tokens the decode model prefills per step while streams decode (its `prefill_budget` parameter; when none
# decode, prompts run whole); 0: as many as take a fixed share of a decode step's time (serving/scheduler.py).
DEFAULT_PREFILL_BUDGET = 0
MAX_STREAM_INTERVAL = 256
# The most alternatives a request may ask log-probabilities for at each step (OpenAI's top_logprobs bound).
MAX_TOP_LOGPROBS = 20


class ParameterError(ValueError):
    """A request parameter outside its allowed range; the message names the field."""


@dataclasses.dataclass
class GenerationParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float | None = None  # None: 1.0 when sampling
    top_k: int = 0              # 0 = no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    do_sample: bool | None = None  # None: sample only when temperature, top_k > 1 or top_p < 1 asks for it
    end_id: int | None = None
    pad_id: int | None = None
    stop_words: list[str] = dataclasses.field(default_factory=list)
    bad_words: list[str] = dataclasses.field(default_factory=list)
    return_log_probs: bool = False
    # The log-probabilities of this many most likely tokens at each step, beside the chosen token's.
    top_logprobs: int = 0
    # Each token's id, text, log-probability and alternatives as JSON in the front model's `tokens_json` output
    # (what the HTTP frontend's logprobs and TGI's token events are made from).
    return_tokens: bool = False
    # max_tokens larger than the room the prompt leaves is cut to that room instead of refused: what a default
    # value wants (OpenAI's "until the context is full", MindSpore Serving's 300), not a client's explicit one.
    fit_max_tokens: bool = False
    exclude_input_in_output: bool = True
    stream: bool = True
    # Tokens per streamed response (the first token always comes alone, the last response may hold fewer).
    # None: the decode model's `stream_interval` parameter (1 unless the operator set it).
    stream_interval: int | None = None
    # Special tokens (end, chat-template markers) left out of the text, as transformers' decode does by default.
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        """Greedy unless sampling is asked for: as transformers' do_sample=False and tensorrtllm_backend's
        top_k/top_p defaults, a request with no sampling settings gets the most likely tokens."""
        if self.do_sample is False or self.temperature == 0.0 or self.top_k == 1:
            return True
        return not (self.do_sample or self.temperature is not None or self.top_k > 1 or self.top_p < 1.0)

    @property
    def sampling_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    def validate(self, max_new_tokens_limit: int, vocab_size: int) -> "GenerationParams":
        def check(ok: bool, field: str, allowed: str, value) -> None:
            if not ok:
                raise ParameterError(f"'{field}' must be {allowed}, got {value!r}")

        if self.fit_max_tokens and self.max_tokens > max_new_tokens_limit:
            self.max_tokens = max_new_tokens_limit
        check(1 <= self.max_tokens <= max_new_tokens_limit, "max_tokens",
              f"in [1, {max_new_tokens_limit}] for this prompt", self.max_tokens)
        check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", f"in [0, max_tokens={self.max_tokens}]",
              self.min_tokens)
        check(self.temperature is None or self.temperature >= 0.0, "temperature", ">= 0", self.temperature)
        check(self.top_k >= 0, "top_k", ">= 0 (0 disables it)", self.top_k)
        check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        check(self.repetition_penalty > 0.0, "repetition_penalty", "> 0", self.repetition_penalty)
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        check(self.seed is None or 0 <= self.seed < 2 ** 64, "seed", "in [0, 2^64)", self.seed)
        check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", f"in [0, {MAX_TOP_LOGPROBS}]",
              self.top_logprobs)
        check(self.stream_interval is None or 1 <= self.stream_interval <= MAX_STREAM_INTERVAL, "stream_interval",
              f"in [1, {MAX_STREAM_INTERVAL}]", self.stream_interval)
        for field in ("end_id", "pad_id"):
            value = getattr(self, field)
            check(value is None or 0 <= value < vocab_size, field, f"in [0, {vocab_size})", value)
        return self
