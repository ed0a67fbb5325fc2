"""Constrained decoding: a request's grammar (a JSON schema, any JSON object, a regex, a choice of strings, a
Lark or GBNF grammar) held by an llguidance matcher, which gives each step a bitmask of the tokens that keep the
output inside the grammar.

The request names its constraint in one JSON object, `structured_outputs`, with vLLM's keys (exactly one of
`json`, `json_object`, `regex`, `choice`, `grammar`). The tokenizer step checks it (grammar_of + validate), so a
bad one is refused with the field named before anything runs. The decode model compiles it against the
vocabulary on a thread of its own (GrammarCompiler: compiled grammars are kept by their text, each request gets a
copy); the request waits for it in the queue while the others go on. Each step, the rows under a grammar get
their masks in one call that fills them on llguidance's threads (GIL released), and the masked logits are
sampled as any others (engine/sampling.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import threading
from pathlib import Path

import llguidance
import numpy as np
from llguidance import LLMatcher, LLTokenizer

from ..params import ParameterError

FIELD = "structured_outputs"
KINDS = ("json", "json_object", "regex", "choice", "grammar")
# JSON under a schema is written compactly (", " and ": " between items, no free whitespace): small models given a
# free hand at whitespace write newlines until max_tokens.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
COMPILED_CACHE = 64  # compiled grammars kept by their text
VALIDATED_CACHE = 256


def grammar_of(spec, field: str = FIELD, value_field: str | None = None) -> str:
    """The llguidance grammar of a `structured_outputs` object; a ParameterError naming the field when the
    object is malformed (its grammar's own errors are found by validate). Errors about the value name it
    `field.KIND`, or `value_field` (a client's own field for it: vLLM's guided_regex, TGI's grammar.value)."""
    if not isinstance(spec, dict):
        raise ParameterError(f"'{field}' must be a JSON object with one of the keys {', '.join(KINDS)}")
    given = [k for k in spec if spec[k] is not None and spec[k] is not False]
    unknown = [k for k in given if k not in KINDS]
    if unknown:
        raise ParameterError(f"'{field}.{unknown[0]}' is not a kind of structured output; the kinds are "
                             f"{', '.join(KINDS)}")
    if len(given) != 1:
        raise ParameterError(f"'{field}' must hold exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) or 'none'}")
    kind = given[0]
    value = spec[kind]
    name = value_field or f"{field}.{kind}"
    if kind == "json_object":
        if value is not True:
            raise ParameterError(f"'{name}' must be true")
        return _json_schema_grammar({"type": "object"})
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ParameterError(f"'{name}' must be a JSON schema (an object, or its JSON text): {exc}") from None
        if not isinstance(value, (dict, bool)):
            raise ParameterError(f"'{name}' must be a JSON schema (an object), got {type(value).__name__}")
        return _json_schema_grammar(value)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ParameterError(f"'{name}' must be a non-empty regular expression")
        return LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ParameterError(f"'{name}' must be a non-empty list of non-empty strings")
        return llguidance.grammar_from("choice", json.dumps(value))
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(f"'{name}' must be a Lark or GBNF grammar (text)")
    try:  # GBNF (llama.cpp's `root ::= ...`) or Lark: llguidance reads either
        return llguidance.grammar_from("grammar", value)
    except ValueError as exc:
        raise ParameterError(f"'{name}' is not a grammar this server reads: {exc}") from None


def _json_schema_grammar(schema) -> str:
    if isinstance(schema, dict) and "x-guidance" not in schema:
        schema = {**schema, "x-guidance": COMPACT_JSON}
    return LLMatcher.grammar_from_json_schema(json.dumps(schema))


def one_line(error: str) -> str:
    """llguidance's message (several lines, with a caret under the place) as one line for an HTTP error."""
    return " ".join(error.split())


@functools.lru_cache(maxsize=VALIDATED_CACHE)
def grammar_error(grammar: str) -> str:
    """What is wrong with an llguidance grammar ("" when it compiles), kept for repeated texts."""
    return LLMatcher.validate_grammar(grammar)


def cannot_compile(field: str, error: str) -> ParameterError:
    return ParameterError(f"'{field}' cannot be compiled: {one_line(error)}")


def checked_grammar(spec, field: str = FIELD, value_field: str | None = None) -> str:
    """The grammar of a `structured_outputs` object, checked: a ParameterError naming the field says what is wrong
    (a malformed object, a schema feature llguidance lacks, a regex that does not parse, a grammar with no
    `start`). `value_field`: as grammar_of's."""
    grammar = grammar_of(spec, field, value_field)
    error = grammar_error(grammar)
    if error:
        raise cannot_compile(field, error)
    return grammar


def check(text: str, field: str = FIELD) -> str:
    """checked_grammar of a `structured_outputs` JSON text."""
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ParameterError(f"'{field}' must be a JSON object: {exc}") from None
    return checked_grammar(spec, field)


# ---- the vocabulary ---------------------------------------------------------------------------------------

class _PieceTokens:
    """What llguidance's TokenizerWrapper reads of a tokenizer it cannot load itself (sentencepiece): each token's
    bytes, the end and begin ids, and a tokenizer of bytes. llguidance tokenizes the bytes a grammar forces (the
    "es" after "y" of "yes") and expects no more than those bytes back; sentencepiece's own encoder adds its
    dummy-prefix space ("▁es"), so the bytes are tokenized here greedily, the longest piece first."""

    def __init__(self, tokenizer, end_id: int):
        sp = tokenizer.sp
        self.tokens = [_piece_bytes(sp, i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id = end_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
        special = set(self.special_token_ids)
        self._ids = {}
        for i, data in enumerate(self.tokens):
            if i not in special and data:
                self._ids.setdefault(data, i)
        self._longest = max(len(t) for t in self._ids)

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        out, at = [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids.get(data[at:at + size])
                if token is not None:
                    out.append(token)
                    at += size
                    break
            else:
                at += 1  # a byte no piece holds (a byte-fallback vocabulary has them all)
        return out


def _piece_bytes(sp, i: int) -> bytes:
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):  # "<0xE4>"
        return bytes([int(piece[3:5], 16)])
    if sp.is_control(i) or sp.is_unknown(i):  # its name ("</s>"): llguidance knows it as special by its id
        return piece.encode("utf-8")
    return piece.replace("\u2581", " ").encode("utf-8")


def grammar_tokenizer(tokenizer_file: Path, vocab_size: int, end_ids: list[int]) -> LLTokenizer:
    """The vocabulary llguidance masks, from the tokenizer model's file: tokenizer.json read by llguidance itself,
    a sentencepiece model through its pieces. `vocab_size`: the model's (often padded beyond the tokenizer's; the
    ids past it are never allowed). Any of `end_ids` ends a grammar."""
    tokenizer_file = Path(tokenizer_file)
    if tokenizer_file.name.endswith(".json"):
        return LLTokenizer(str(tokenizer_file), n_vocab=vocab_size, eos_token=list(end_ids))
    from ..tokenizer import load_tokenizer
    wrapped = llguidance.TokenizerWrapper(_PieceTokens(load_tokenizer(tokenizer_file), end_ids[0]))
    return LLTokenizer(wrapped, n_vocab=vocab_size, eos_token=list(end_ids))


# ---- compiling, off the decode loop -----------------------------------------------------------------------

class GrammarCompiler:
    """Grammars compiled against the vocabulary on a worker thread (llguidance lets go of the GIL while it
    compiles), kept by their text: a request's matcher is a copy of the kept one. `make_tokenizer` is called once,
    on the worker, when the first grammar arrives (reading a vocabulary takes a moment)."""

    def __init__(self, make_tokenizer, threads: int = 1, cache_size: int = COMPILED_CACHE):
        self._make_tokenizer = make_tokenizer
        self._tokenizer: LLTokenizer | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="mstriton-grammar")
        self._compiled: collections.OrderedDict[str, LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.cache_hits = 0  # requests given a copy of a kept grammar

    @property
    def tokenizer(self) -> LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def submit(self, grammar: str) -> concurrent.futures.Future:
        """A future of a fresh matcher for `grammar` (an llguidance grammar: grammar_of's), or of the error."""
        return self._pool.submit(self.matcher, grammar)

    def matcher(self, grammar: str) -> LLMatcher:
        with self._lock:
            kept = self._compiled.get(grammar)
            if kept is not None:
                self._compiled.move_to_end(grammar)
                self.cache_hits += 1
                return kept.deep_copy()
        compiled = LLMatcher(self.tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise cannot_compile(FIELD, compiled.get_error())
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @classmethod
    def for_tokenizer_model(cls, model_dir: Path) -> "GrammarCompiler":
        """The compiler of an LLM's grammars, over the vocabulary its tokenizer model (NAME_tokenizer, whose
        folder is `model_dir`) serves: its tokenizer file, the model's vocabulary size and end ids."""
        from ..repository import VERSION, read_config
        parameters = {k: v.string_value for k, v in read_config(Path(model_dir)).parameters.items()}
        tokenizer_file = Path(model_dir) / VERSION / parameters.get("tokenizer", "tokenizer.model")
        end_ids = [int(i) for i in parameters.get("end_ids", parameters.get("eos_id", "")).split(",") if i.strip()]
        return cls(lambda: grammar_tokenizer(tokenizer_file, int(parameters["vocab_size"]), end_ids))


# ---- each step's masks ------------------------------------------------------------------------------------

class GrammarMasks:
    """The bitmasks of a step's rows under a grammar, filled in one call (llguidance's threads, GIL released), and
    applied to those rows' logits."""

    def __init__(self, threads: int | None = None):
        self._executor = llguidance.LLExecutor(threads)
        self._bitmask = np.zeros((0, 0), np.int32)

    def allowed(self, matchers: list[LLMatcher], vocab_size: int) -> np.ndarray:
        """[len(matchers), vocab_size] bool: the tokens each matcher allows next."""
        words = (vocab_size + 31) // 32
        if self._bitmask.shape[0] < len(matchers) or self._bitmask.shape[1] != words:
            self._bitmask = np.zeros((max(len(matchers), 1), words), np.int32)
        bitmask = self._bitmask[:len(matchers)]
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.ctypes.data,
                                               words * 4, len(matchers))
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        return bits[:, :vocab_size].astype(bool)
