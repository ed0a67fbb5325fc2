"""The KV-cache / scheduling scenarios of tools/bench_kv_cache.py: their prompts, and the figures computed from
what the server streamed back. Pure functions (no server, no client): the tool does the sending.

Texts are made of a fixed English word list shuffled by a seeded random.Random, so they are the same on every run
and every version of the code (unlike the demo corpus of workload.py, which holds the package's docstrings), and
cut to a token count with the served model's own tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from typing import Iterable, Sequence

# Plain words that tokenize to one or two tokens each for a byte-level BPE or a sentencepiece vocabulary.
WORDS = (
    "the a an of to in on for with by from at as is are was were be been has have had will would can could "
    "should may might must do does did not no yes and or but if then when while because so that this these "
    "those it its they them their we our you your he she his her one two three four five six seven eight nine "
    "ten first second third last next new old small large long short high low early late good great simple "
    "clear quick slow strong light dark warm cold open close part place time day week year world city country "
    "river mountain forest field garden house room door window table chair book page letter word sentence story "
    "question answer idea reason result problem method system model server request token cache memory batch "
    "stream queue engine kernel layer weight value number list order group team project report plan test check "
    "read write send build run start stop keep move turn show find make take give tell ask work learn teach "
    "study travel walk talk listen watch follow change grow carry hold bring visit explain describe compare "
    "measure count share store load save print repeat water fire earth air stone wood paper glass metal light "
    "sound color music voice picture map road bridge train ship car bus morning evening night summer winter "
    "spring autumn rain snow wind cloud sun moon star sea lake island valley hill village market school "
    "library museum kitchen office student teacher doctor farmer writer engineer driver friend family child"
).split()
END_MARKS = ".", ".", ".", ",", ";", "?"


def word_stream(seed: int, count: int) -> list[str]:
    """`count` words of WORDS in a seeded order, in sentences (capitalised, ending with a mark)."""
    rng = random.Random(seed)
    words, sentence_left = [], 0
    for _ in range(count):
        word = rng.choice(WORDS)
        if sentence_left == 0:
            word = word.capitalize()
            sentence_left = rng.randint(6, 16)
        sentence_left -= 1
        if sentence_left == 0:
            word += rng.choice(END_MARKS)
        words.append(word)
    return words


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def text_of_tokens(tokenizer, length: int, seed: int, prefix: str = "", suffix: str = "") -> str:
    """prefix + seeded words + suffix, with as many words as keep the whole text at or below `length` tokens of
    `tokenizer` (anything with encode(text) -> ids): exactly `length` when the last word fits, one or two
    tokens short when it does not (the count is measured again by the caller and reported)."""
    words = word_stream(seed, max(8, 2 * length))
    make = lambda n: prefix + " ".join(words[:n]) + suffix  # noqa: E731
    while token_count(tokenizer, make(len(words))) < length:  # a tokenizer with many tokens per word
        words += word_stream(seed + len(words), len(words))
    low, high = 0, len(words)  # largest n with count(make(n)) <= length: counts grow with n
    while low < high:
        middle = (low + high + 1) // 2
        if token_count(tokenizer, make(middle)) <= length:
            low = middle
        else:
            high = middle - 1
    return make(low)


def question_text(tokenizer, length: int, seed: int) -> str:
    """A different question of about `length` tokens per seed."""
    return text_of_tokens(tokenizer, length, seed, prefix=f"Question {seed}: ", suffix=" What does it mean?")


def shared_prefix_prompt(system: str, question: str) -> str:
    return f"{system}\n\n{question}"


# ---- multi-turn ---------------------------------------------------------------------------------------------

def conversation_text(turns: Sequence[tuple[str, str | None]]) -> str:
    """A chat as plain text: each (user message, answer) pair; the last answer None (the one to generate)."""
    parts = []
    for user, answer in turns:
        parts.append(f"User: {user}\nAssistant:")
        if answer is not None:
            parts[-1] += answer + "\n"
    return "".join(parts)


@dataclasses.dataclass
class TurnResult:
    turn: int            # 1-based
    prompt_tokens: int   # the whole conversation so far, as the server counted it
    new_tokens: int      # prompt_tokens minus the previous turn's
    ttft_ms: float


def turn_results(prompt_tokens: Sequence[int], ttfts_ms: Sequence[float]) -> list[TurnResult]:
    """Per turn of one conversation: its prompt length, the tokens this turn added, its time to first token."""
    results, previous = [], 0
    for i, (tokens, ttft) in enumerate(zip(prompt_tokens, ttfts_ms)):
        results.append(TurnResult(i + 1, int(tokens), int(tokens) - previous, float(ttft)))
        previous = int(tokens)
    return results


def median_turns(conversations: Sequence[Sequence[TurnResult]]) -> list[dict]:
    """Per turn, the median over conversations of prompt tokens, new tokens and TTFT."""
    rows = []
    for turn in range(1, max((len(c) for c in conversations), default=0) + 1):
        of_turn = [t for c in conversations for t in c if t.turn == turn]
        rows.append({"turn": turn, "conversations": len(of_turn),
                     "prompt_tokens": integral(median([t.prompt_tokens for t in of_turn])),
                     "new_tokens": integral(median([t.new_tokens for t in of_turn])),
                     "ttft_ms": median([t.ttft_ms for t in of_turn]),
                     "ttft_ms_each": [round(t.ttft_ms, 1) for t in of_turn]})
    return rows


# ---- statistics ---------------------------------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile, linear interpolation between closest ranks (numpy's default); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = int(math.floor(position))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def integral(value):
    """An int for a float that is a whole number (token counts, gauge values), else the value."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def gaps_in_window(streams: Iterable[Sequence[float]], start: float, end: float) -> list[float]:
    """Inter-token gaps (seconds) of every stream whose later token arrived within [start, end]."""
    gaps = []
    for times in streams:
        gaps += [later - earlier for earlier, later in zip(times, times[1:]) if start <= later <= end]
    return gaps


def all_gaps(streams: Iterable[Sequence[float]]) -> list[float]:
    return gaps_in_window(streams, -math.inf, math.inf)


def latency_summary(values_s: Sequence[float]) -> dict:
    """Count, p50, p90, p99 and max in milliseconds of latencies given in seconds."""
    ms = [v * 1e3 for v in values_s]
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else math.nan}


def target_check(value: float, target: float) -> dict:
    """A ratio measured against its target (the target is the highest acceptable value)."""
    return {"value": value, "target": target, "met": bool(value <= target) if math.isfinite(value) else False}


def safe_ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


# ---- Prometheus metrics -------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Prometheus text format: (family name -> type, [(sample name, labels, value)])."""
    types, samples = {}, []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
            continue
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        samples.append((match.group(1), dict(_LABEL.findall(match.group(2) or "")), value))
    return types, samples


def model_gauges(text: str, model: str, prefix: str = "") -> dict[str, float]:
    """Every gauge whose samples carry model="<model>" (and whose name starts with `prefix`): name -> value
    (summed over that model's samples)."""
    types, samples = parse_metrics(text)
    gauges: dict[str, float] = {}
    for name, labels, value in samples:
        if types.get(name) == "gauge" and name.startswith(prefix) and labels.get("model") == model:
            gauges[name] = gauges.get(name, 0.0) + value
    return gauges


def gauge_maxima(snapshots: Iterable[dict[str, float]]) -> dict[str, float]:
    maxima: dict[str, float] = {}
    for snapshot in snapshots:
        for name, value in snapshot.items():
            maxima[name] = max(value, maxima.get(name, -math.inf))
    return maxima


# ---- tables -------------------------------------------------------------------------------------------------

def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cell(value, digits: int = 1) -> str:
    """A table cell: empty for None (nothing to show there), else fmt."""
    return "" if value is None else fmt(value, digits)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], digits: int = 1) -> list[str]:
    """A Markdown table; columns of numbers (empty cells aside) right-aligned, floats with `digits` decimals."""
    numeric = [any(is_number(r[i]) for r in rows) and all(is_number(r[i]) or r[i] is None for r in rows)
               for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v, digits) for v in row) + " |" for row in rows]
    return lines


def text_table(headers: Sequence[str], rows: Sequence[Sequence], digits: int = 1) -> str:
    """The same table for a terminal: columns padded to their widest cell."""
    cells = [list(headers)] + [[cell(v, digits) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(cell.rjust(w) if r and i else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for r, row in enumerate(cells))
