"""Per-request generation parameters: names, defaults, allowed ranges, and their validation.

PARAMETERS is the one table of them (name, aliases, Triton type, default, range, which frontend doors read it);
GenerationParams, the Triton configs' client inputs, request parsing, the doors' field maps and docs/inputs.md's
table are made from it. Names follow tensorrtllm_backend's ensemble inputs (so its clients and genai-perf work
unchanged), with the older and the MindSpore Serving / TGI spellings accepted as aliases. Every error names the
field and its allowed range.
"""

from __future__ import annotations

import dataclasses
import json
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


# ---- the request parameters: one table ------------------------------------------------------------------
# Every input a client may send the Triton models, in the order their configs declare them. From it come
# GenerationParams (its fields, defaults and range checks with their messages), the inputs the front and unary
# models' configs declare (repository.CLIENT_INPUTS), the names parse_request reads (serving/requests.py), what
# the HTTP frontend's doors read into which input (frontend/fields.door_settings) and the inputs table of
# docs/inputs.md (inputs_table()). A new sampling setting is one row here, plus the code that uses it.
#
# Each setting is its own typed input, as tensorrtllm_backend declares them (its clients, genai-perf and KServe
# callers send them so); the front model passes them on to the ensemble as one JSON text (params_json).

TRITON_TYPES = ("TYPE_INT32", "TYPE_UINT64", "TYPE_FP32", "TYPE_BOOL", "TYPE_STRING")
# The DOORS of the HTTP frontend that read request parameters into the Triton inputs
DOORS = ("openai", "tgi", "mindspore_serving")
# Bounds that depend on the request: what validate() is given -> how the inputs table names them
REQUEST_BOUNDS = {"max_new_tokens_limit": "max_seq_len - prompt tokens", "vocab_size": "vocab"}


@dataclasses.dataclass(frozen=True)
class DoorField:
    """How a door of the HTTP frontend reads a parameter from its body: the client's name for it, the door's default
    when the client leaves it out, and the door's own bounds (checked by the door, whose error names the client's
    field; None: not bounded there, the Triton models check it)."""
    name: str | None = None  # None: the parameter's own name
    default: object = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One request parameter: a Triton input of the front model (and of NAME_unary), under its name and aliases."""
    name: str                       # the Triton input and GenerationParams' field
    triton_type: str                # its type in the Triton configs (TRITON_TYPES)
    default: object = None          # GenerationParams' default; None: unset
    doc: str = ""                   # what it does, for the inputs table
    aliases: tuple[str, ...] = ()   # other inputs for the same field (older names, MindSpore Serving's, TGI's)
    negated: tuple[str, ...] = ()   # inputs meaning the field's negation
    # the allowed range, checked by GenerationParams.validate: a number, the name of a field that bounds it
    # (min_tokens <= max_tokens), or a key of REQUEST_BOUNDS; an FP32 without `high` must be finite
    low: float | str | None = None
    high: float | str | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""                  # said after the range in its error
    default_doc: str = ""           # the table's default, where the value alone does not say it
    allowed_doc: str = ""           # the table's allowed values of a text or a list (their sizes: RequestLimits)
    many: bool = False              # a list (dims [-1]), else one value (a list of str; of int for an INT32)
    # a check of a value beyond its range (a JSON text's content): check(value, limits) raises ParameterError
    check: object = dataclasses.field(default=None, hash=False, compare=False)
    setting: bool = True            # a GenerationParams field (text_input, messages and stop are parse_request's)
    unary: bool = True              # NAME_unary takes it too (stop is the front model's only)
    doors: dict = dataclasses.field(default_factory=dict, hash=False)  # DOORS key -> DoorField

    def __post_init__(self):
        if self.triton_type not in TRITON_TYPES or not set(self.doors) <= set(DOORS):
            raise ValueError(f"{self.name}: a type of {TRITON_TYPES} and doors of {DOORS}")

    @property
    def kind(self) -> type:
        """What a value is read as: int, float, bool, str, or list (of str)."""
        if self.many:
            return list
        return {"TYPE_INT32": int, "TYPE_UINT64": int, "TYPE_FP32": float, "TYPE_BOOL": bool,
                "TYPE_STRING": str}[self.triton_type]

    @property
    def input_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases, *self.negated)

    @property
    def dims(self) -> list[int]:
        return [-1] if self.many else [1]

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None

    def _bounds(self, params, limits) -> tuple:
        def value(bound):
            if isinstance(bound, str):
                return limits[bound] if bound in REQUEST_BOUNDS else getattr(params, bound)
            return bound
        high, high_open = value(self.high), self.high_open
        if high is None and self.kind is float:
            high, high_open = math.inf, True
        return value(self.low), high, high_open

    def admits(self, value, params, limits: dict) -> bool:
        """Whether `value` is in range (NaN never is); `params`: the request's GenerationParams, `limits`: the
        REQUEST_BOUNDS."""
        low, high, high_open = self._bounds(params, limits)
        return ((low is None or (low < value if self.low_open else low <= value)) and
                (high is None or (value < high if high_open else value <= high)))

    def allowed(self, params=None, limits: dict | None = None) -> str:
        """The allowed range as an error says it ("in [0, max_tokens=16]"); without `params`, as the inputs table
        says it ("[0, max_tokens]")."""
        def shown(bound):
            if isinstance(bound, str):
                if params is None:
                    return REQUEST_BOUNDS.get(bound, bound)
                return str(limits[bound]) if bound in REQUEST_BOUNDS else f"{bound}={getattr(params, bound)}"
            if isinstance(bound, int) and bound >= 2 ** 32 and bound & (bound - 1) == 0:
                return f"2^{bound.bit_length() - 1}"
            return str(bound) if isinstance(bound, int) else f"{bound:g}"

        if self.low is not None and self.high is not None:
            text = (f"{'(' if self.low_open else '['}{shown(self.low)}, {shown(self.high)}"
                    f"{')' if self.high_open else ']'}")
            return text if params is None else f"in {text}{' ' + self.note if self.note else ''}"
        if self.low is None:
            text = f"{'<' if self.high_open else '<='} {shown(self.high)}"
        else:
            text = f"{'>' if self.low_open else '>='} {shown(self.low)}{' and finite' if self.kind is float else ''}"
        return text if params is None else f"{text}{' ' + self.note if self.note else ''}"

    @property
    def item_kind(self) -> type:
        """What a list's items are read as."""
        return int if self.triton_type == "TYPE_INT32" else str

    @property
    def annotation(self):
        if self.many:
            return list[self.item_kind]
        return self.kind | None if self.default is None else self.kind


MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOP_TOKEN_IDS = 64


def check_token_ids(field: str, ids: list, vocab_size: int) -> None:
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ParameterError(f"'{field}' may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ParameterError(f"'{field}[{i}]' must be a token id in [0, {vocab_size}), got {token!r}")


def logit_biases(text: str) -> dict[int, float]:
    """logit_bias's JSON text -> {token id: bias}, unchecked against the vocabulary (check_logit_bias does)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ParameterError(f"'logit_bias' must be a JSON object of token id -> bias: {exc}") from None
    if not isinstance(value, dict):
        raise ParameterError("'logit_bias' must be a JSON object of token id -> bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise ParameterError(f"'logit_bias' keys must be token ids, got {key!r:.40}") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ParameterError(f"'logit_bias[{key}]' must be a number in [-100, 100], got {bias!r:.40}")
        out[token] = float(bias)
    return out


def check_logit_bias(text: str, vocab_size: int) -> None:
    biases = logit_biases(text)
    if len(biases) > MAX_LOGIT_BIAS_ENTRIES:
        raise ParameterError(f"'logit_bias' may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(biases)}")
    for token in biases:
        if not 0 <= token < vocab_size:
            raise ParameterError(f"'logit_bias' keys must be token ids in [0, {vocab_size}), got {token}")


MAX_TOOLS = 128


def template_tools(text: str) -> list[dict]:
    """`tools`' JSON text -> OpenAI's function tools, as the chat template is given them. Errors name the field."""
    try:
        tools = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ParameterError(f"'tools' must be a JSON list of function tools: {exc}") from None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ParameterError(f"'tools' must be a JSON list of at most {MAX_TOOLS} function tools")
    if json_depth_exceeds(tools, MAX_JSON_DEPTH):
        raise ParameterError(f"'tools' must not nest lists and objects more than {MAX_JSON_DEPTH} deep")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ParameterError(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    return tools


def check_structured_outputs(text: str) -> None:
    from .engine.structured_output import check  # llguidance: imported where a grammar is met
    check(text)


_BYTES = f"at most {RequestLimits.max_prompt_bytes >> 20} MiB"
_WORDS = (f"at most {RequestLimits.max_words} strings (each item one, or several joined by commas) of at most "
          f"{RequestLimits.max_word_bytes} bytes")

PARAMETERS: tuple[Parameter, ...] = (
    Parameter("text_input", "TYPE_STRING", setting=False, default_doc="required, unless `messages`",
              allowed_doc=f"non-empty UTF-8, {_BYTES} (see below)",
              doc="the prompt (wrapped as a user message when a template was named at conversion)"),
    Parameter("max_tokens", "TYPE_INT32", 16, "tokens to generate", aliases=("max_new_tokens",),
              low=1, high="max_new_tokens_limit", note="for this prompt",
              doors={"tgi": DoorField("max_new_tokens", low=1),
                     "mindspore_serving": DoorField("max_new_tokens", low=1)}),
    Parameter("min_tokens", "TYPE_INT32", 0, "the end id is banned before this many", aliases=("min_length",),
              low=0, high="max_tokens", doors={"openai": DoorField(low=0)}),
    Parameter("stream", "TYPE_BOOL", True, "on `NAME`: one response per token, or one at the end"),
    Parameter("exclude_input_in_output", "TYPE_BOOL", True, "false: the text begins with the prompt",
              negated=("return_full_text",)),
    Parameter("end_id", "TYPE_INT32", None, "replaces them", low=0, high="vocab_size", high_open=True,
              default_doc="the model's end ids (all of them: generation_config.json, config.json, the "
                          "tokenizer's eos)"),
    Parameter("pad_id", "TYPE_INT32", None, "tensorrtllm_backend's; checked, not used (no response is padded)",
              low=0, high="vocab_size", high_open=True, default_doc="none"),
    Parameter("stop_words", "TYPE_STRING", None, "stop after any of these (a word that tokenizes to nothing is left "
              "out)", many=True, default_doc="none", allowed_doc=_WORDS),
    Parameter("bad_words", "TYPE_STRING", None, "never produce these (a word that tokenizes to nothing is left out)",
              many=True, default_doc="none", allowed_doc=_WORDS),
    Parameter("top_k", "TYPE_INT32", 0, "sample from the k most likely tokens (0: off; 1: greedy)", low=0,
              note="(0 disables it)",
              doors={"openai": DoorField(low=-1), "tgi": DoorField(low=0),
                     "mindspore_serving": DoorField(default=3, low=0, high=2 ** 31 - 1)}),
    Parameter("top_p", "TYPE_FP32", 1.0, "exact nucleus", low=0.0, high=1.0, low_open=True,
              doors={"openai": DoorField(low=0.0, high=1.0, low_open=True),
                     "tgi": DoorField(low=0.0, high=1.0, low_open=True),
                     "mindspore_serving": DoorField(default=1.0, low=0.01, high=1.0)}),
    Parameter("temperature", "TYPE_FP32", None, "0: greedy", low=0.0, default_doc="1.0 when sampling",
              doors={"openai": DoorField(low=0.0, high=2.0), "tgi": DoorField(low=0.0),
                     "mindspore_serving": DoorField(default=1.0, low=0.0, low_open=True)}),
    Parameter("repetition_penalty", "TYPE_FP32", 1.0, "over prompt and output, as transformers", low=0.0,
              low_open=True,
              doors={"openai": DoorField(), "tgi": DoorField(low=0.0, low_open=True),
                     "mindspore_serving": DoorField(default=1.0, low=0.0, low_open=True)}),
    Parameter("presence_penalty", "TYPE_FP32", 0.0, "over the output, as OpenAI's API", low=-2.0, high=2.0,
              doors={"openai": DoorField(low=-2.0, high=2.0)}),
    Parameter("frequency_penalty", "TYPE_FP32", 0.0, "over the output, as OpenAI's API", low=-2.0, high=2.0,
              doors={"openai": DoorField(low=-2.0, high=2.0), "tgi": DoorField(low=-2.0, high=2.0)}),
    Parameter("seed", "TYPE_UINT64", None, "same seed, same tokens, whatever runs beside it",
              aliases=("random_seed",), low=0, high=2 ** 64, high_open=True, default_doc="none",
              doors={"openai": DoorField(low=0, high=2 ** 63), "tgi": DoorField(low=0, high=2 ** 63)}),
    Parameter("do_sample", "TYPE_BOOL", None, "false: greedy; unset: greedy unless temperature, top_k > 1 or "
              "top_p < 1 is given", default_doc="unset",
              doors={"tgi": DoorField(), "mindspore_serving": DoorField(default=False)}),
    Parameter("return_log_probs", "TYPE_BOOL", False, "tensorrtllm_backend's; log-probabilities are always returned"),
    Parameter("stream_interval", "TYPE_INT32", None, "tokens per streamed response: the first token comes alone, "
              "then this many at a time", low=1, high=MAX_STREAM_INTERVAL,
              default_doc="1 (the decode model's `stream_interval` parameter)"),
    Parameter("stop", "TYPE_BOOL", False, "with the request id of a running request: stop it", setting=False,
              unary=False),
    Parameter("messages", "TYPE_STRING", setting=False, default_doc="none",
              allowed_doc=f'a JSON list (text, {_BYTES}) of at most {RequestLimits.max_messages} '
                          '`{"role", "content"}`, roles `system`, `user`, `assistant`, `tool`',
              doc="a chat instead of `text_input`, rendered by the model's chat template (as transformers' "
                  "`apply_chat_template(add_generation_prompt=True)`)"),
    Parameter("skip_special_tokens", "TYPE_BOOL", True, "leave special tokens (end, chat markers) out of the text",
              doors={"openai": DoorField()}),
    Parameter("top_logprobs", "TYPE_INT32", 0, "also the log-probabilities of this many most likely tokens at each "
              "step", low=0, high=MAX_TOP_LOGPROBS,
              doors={"tgi": DoorField("top_n_tokens", low=0, high=MAX_TOP_LOGPROBS)}),
    Parameter("return_tokens", "TYPE_BOOL", False, "each new token's id, text, log-probability, special flag and "
              "alternatives in `tokens_json`"),
    Parameter("min_p", "TYPE_FP32", 0.0, "sampling drops tokens less likely than min_p times the most likely one "
              "(after temperature; 0: off)", low=0.0, high=1.0,
              doors={"openai": DoorField(low=0.0, high=1.0)}),
    Parameter("logit_bias", "TYPE_STRING", None, "added to the logits of these token ids before choosing (greedy "
              "too), as OpenAI's API", default_doc="none",
              allowed_doc="a JSON object, token id (text) -> bias in [-100, 100], at most 1024 entries",
              check=lambda value, limits: check_logit_bias(value, limits["vocab_size"])),
    Parameter("stop_token_ids", "TYPE_INT32", None, "also end on these token ids (as the end ids: not before "
              "min_tokens)", many=True, default_doc="none", allowed_doc="ids in [0, vocab), at most 64",
              check=lambda value, limits: check_token_ids("stop_token_ids", value, limits["vocab_size"])),
    Parameter("structured_outputs", "TYPE_STRING", None, "constrain the output: a JSON object with one of `json` (a "
              "schema), `json_object` (true), `regex`, `choice` (a list of strings), `grammar` (Lark or GBNF), as "
              "vLLM's; every token is chosen among those the grammar allows", default_doc="none",
              allowed_doc="a JSON object (text) of one kind; a grammar that does not compile is refused",
              check=lambda value, limits: check_structured_outputs(value)),
    Parameter("tools", "TYPE_STRING", None, "function tools given to the chat template (as transformers' "
              "`apply_chat_template(tools=...)`) for models whose template writes tool calls of its own; the HTTP "
              "frontend's OpenAI doors send them", default_doc="none",
              allowed_doc=f'a JSON list (text) of at most {MAX_TOOLS} `{{"type": "function", "function": {{...}}}}`',
              check=lambda value, limits: template_tools(value)),
    Parameter("speculative", "TYPE_BOOL", True, "where the model drafts tokens by n-gram lookup (its decode "
              "model's `speculative` parameter), verify them several per step; false: one token per step. The "
              "output is the same either way", doors={"openai": DoorField()}),
    Parameter("fit_max_tokens", "TYPE_BOOL", False, "a `max_tokens` beyond the room the prompt leaves is cut to it "
              "instead of refused (for defaults)"),
)
# The parameters that are GenerationParams' fields, in its order
SETTINGS: tuple[Parameter, ...] = tuple(p for p in PARAMETERS if p.setting)


def _settings_dataclass(cls):
    """`cls` as a dataclass whose fields are the SETTINGS, with their defaults (a list: empty)."""
    cls.__annotations__ = {p.name: p.annotation for p in SETTINGS}
    for p in SETTINGS:
        setattr(cls, p.name, dataclasses.field(default_factory=list) if p.many else p.default)
    return dataclasses.dataclass(cls)


@_settings_dataclass
class GenerationParams:
    """One request's settings: a field for each of SETTINGS (PARAMETERS' rows), with its default."""

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
        """Every setting in its range, in the table's order; an error names the field and its range.
        Infinity passes a comparison as NaN does not: HTTP generate's JSON takes `Infinity`, and a finite number
        beyond float32's range (1e300) arrives in an FP32 input as inf, so an FP32 without an upper bound must be
        finite."""
        # max_tokens larger than the room the prompt leaves is cut to that room instead of refused: what a default
        # value wants (OpenAI's "until the context is full", MindSpore Serving's 300), not a client's explicit one.
        if self.fit_max_tokens and self.max_tokens > max_new_tokens_limit:
            self.max_tokens = max_new_tokens_limit
        limits = {"max_new_tokens_limit": max_new_tokens_limit, "vocab_size": vocab_size}
        for p in SETTINGS:
            value = getattr(self, p.name)
            if p.check is not None and value is not None:
                p.check(value, limits)
            if not p.bounded or (value is None and p.default is None):
                continue
            if not p.admits(value, self, limits):
                raise ParameterError(f"'{p.name}' must be {p.allowed(self, limits)}, got {value!r}")
        return self


def door_fields(door: str) -> dict[str, str]:
    """The parameters a door of the HTTP frontend reads: Triton input -> the client's field name."""
    return {p.name: p.doors[door].name or p.name for p in PARAMETERS if door in p.doors}


def inputs_table() -> str:
    """The inputs table of docs/inputs.md, in Markdown (tests/test_params.py keeps the file's table equal to it;
    `python -m mstriton.params docs/inputs.md` writes it there)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| input | default | allowed | meaning |", "|---|---|---|---|"]
    for p in PARAMETERS:
        names = f"`{p.name}`" + "".join(f" (`{a}`)" for a in p.aliases) + \
            "".join(f" (`{n}` = not it)" for n in p.negated)
        if p.default_doc:
            default = p.default_doc
        elif isinstance(p.default, bool):
            default = str(p.default).lower()
        else:
            default = str(p.default)
        if p.allowed_doc:
            allowed = p.allowed_doc
        elif p.kind is bool:
            allowed = "bool"
        else:
            allowed = p.allowed() if p.bounded else ""
        rows.append(f"| {names} | {cell(default)} | {cell(allowed)} | {cell(p.doc)} |")
    return "\n".join(rows) + "\n"


def with_inputs_table(text: str) -> str:
    """`text` (a Markdown page) with its inputs table, the lines from inputs_table()'s header to the next line
    that is no table row, replaced by inputs_table()."""
    lines = text.splitlines(keepends=True)
    header = inputs_table().splitlines(keepends=True)[0]
    start = lines.index(header)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join(lines[:start]) + inputs_table() + "".join(lines[end:])


if __name__ == "__main__":
    import sys
    from pathlib import Path

    for page in map(Path, sys.argv[1:]):
        page.write_text(with_inputs_table(page.read_text()))
