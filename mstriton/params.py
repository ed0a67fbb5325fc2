"""Per-request generation parameters: names, defaults, allowed ranges, and their validation.

Names follow tensorrtllm_backend's ensemble inputs (so its clients and genai-perf work unchanged), with the older
and the MindSpore Serving / TGI spellings accepted as aliases. Every error names the field and its allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import os


# Prompt tokens the decode model prefills per step while streams decode (its `prefill_budget` parameter; when none
# decode, prompts run whole); 0: as many as take a fixed share of a decode step's time (serving/scheduler.py).
DEFAULT_PREFILL_BUDGET = 0
MAX_STREAM_INTERVAL = 256
# The most alternatives a request may ask log-probabilities for at each step (OpenAI's top_logprobs bound).
MAX_TOP_LOGPROBS = 20


class ParameterError(ValueError):
    """A request parameter outside its allowed range; the message names the field."""


# ---- limits on what one request may hold ------------------------------------------------------------------
# Checked at every door before anything is tokenized or copied further: the front and unary models
# (serving/requests.py), the tokenizer step (a prompt that cannot fit in max_seq_len tokens is refused from its
# size), the HTTP frontend (its body, prompts and stop strings). One set of defaults, set by environment variables:
# tritonserver passes its environment to the model processes, so one variable sets a limit for the Triton doors and
# for a frontend started beside it.

@dataclasses.dataclass(frozen=True)
class RequestLimits:
    # text_input, a chat's messages (their JSON text), the HTTP frontend's prompt / inputs: UTF-8 bytes. A prompt
    # under this limit can still be refused as too long for the model, by its size (see check_prompt_fits) or,
    # once tokenized, by its length.
    max_prompt_bytes: int = 1 << 20
    # stop_words and bad_words (each), and OpenAI's / TGI's stop strings
    max_words: int = 16
    max_word_bytes: int = 1024
    max_messages: int = 1024
    # the HTTP frontend's request body (413 above it)
    max_body_bytes: int = 4 << 20

    @classmethod
    def from_environment(cls, environ=None) -> "RequestLimits":
        """The defaults, each replaced by its variable (LIMIT_VARIABLES) where that is set."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, variable in LIMIT_VARIABLES.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 1:
                raise ValueError(f"${variable} must be a positive integer, got {text!r}")
            values[field] = value
        return cls(**values)


LIMIT_VARIABLES = {"max_prompt_bytes": "MSTRITON_MAX_PROMPT_BYTES", "max_words": "MSTRITON_MAX_WORDS",
                   "max_word_bytes": "MSTRITON_MAX_WORD_BYTES", "max_messages": "MSTRITON_MAX_MESSAGES",
                   "max_body_bytes": "MSTRITON_MAX_BODY_BYTES"}
LIMITS = RequestLimits.from_environment()
# JSON nested deeper than this is refused (a chat's messages, the frontend's bodies): the requests this server
# reads are a few levels deep, and code that walks a value recursively (json.dumps, repr, a template) must never
# meet Python's recursion limit on a client's value.
MAX_JSON_DEPTH = 64


def check_text_size(field: str, value: bytes | str, limit: int) -> None:
    """Refuse a text of more than `limit` UTF-8 bytes. Bytes are measured as they are. A str longer in characters
    than the limit is refused as it is; a shorter one is encoded, which also refuses the lone surrogates a JSON
    "\\ud800" escape gives Python (the frontend, HTTP generate's parameters): UTF-8 cannot carry them on."""
    if isinstance(value, str):
        if len(value) > limit:
            raise ParameterError(f"'{field}' must be at most {limit} bytes of UTF-8 text, got {len(value)} "
                                 "characters")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ParameterError(f"'{field}' is not valid UTF-8 text (a lone surrogate at character "
                                 f"{exc.start})") from None
    else:
        size = len(value)
    if size > limit:
        raise ParameterError(f"'{field}' must be at most {limit} bytes of UTF-8 text, got {size} bytes")


def check_words(field: str, words: list, max_words: int, max_word_bytes: int) -> None:
    """Stop or bad words (or stop strings): how many, and how long each."""
    if len(words) > max_words:
        raise ParameterError(f"'{field}' may hold at most {max_words} words, got {len(words)}")
    for i, word in enumerate(words):
        check_text_size(f"{field}[{i}]", word, max_word_bytes)


def check_prompt_fits(field: str, size: int, max_seq_len: int, max_token_bytes: int) -> None:
    """Refuse, before tokenizing it, a prompt of `size` UTF-8 bytes larger than max_seq_len - 1 tokens of the
    vocabulary's longest (`max_token_bytes`) could be. Tokens of ordinary text are far shorter, so no prompt that
    fits is refused; only text a tokenizer's normalizer folds (sentencepiece's runs of spaces or of unknown
    characters, which become one token; NFKC's ligatures) could have fitted. (Tokenizing a megabyte took SmolLM2's tokenizer 2.3 s on this machine, all for a refusal.)"""
    limit = (max_seq_len - 1) * max_token_bytes
    if size > limit:
        raise ParameterError(
            f"'{field}' must be at most {limit} bytes for this model ({max_seq_len - 1} tokens of at most "
            f"{max_token_bytes} bytes, its longest; prompts must be shorter than max_seq_len={max_seq_len} tokens), "
            f"got {size} bytes")


def json_depth_exceeds(value, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether lists and objects in `value` nest deeper than `max_depth` (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


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
        # Infinity passes a comparison as NaN does not: HTTP generate's JSON takes `Infinity`, and a finite number
        # beyond float32's range (1e300) arrives in an FP32 input as inf.
        check(self.temperature is None or 0.0 <= self.temperature < math.inf, "temperature", ">= 0 and finite",
              self.temperature)
        check(self.top_k >= 0, "top_k", ">= 0 (0 disables it)", self.top_k)
        check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        check(0.0 < self.repetition_penalty < math.inf, "repetition_penalty", "> 0 and finite",
              self.repetition_penalty)
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
