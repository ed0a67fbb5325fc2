"""The benchmark's requests: prompts of an exact token count, and the shapes and concurrencies of the issue.

Prompts are made of the demo corpus's words (plain text every system under test can take), grown word by word
until the model's own tokenizer, as our converted models serve it, counts exactly the wanted number of tokens
(BOS included where that tokenizer adds one): a sentencepiece tokenizer.model (the demo model and the random
100M LLaMA) or a Hugging Face tokenizer.json (SmolLM2: the one our converter writes from its GGUF file). Each
request gets a different prompt, so no system can answer from a prompt cache.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from mstriton.tokenizer import TextTokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    prompt_tokens: int
    output_tokens: int


SHAPES = [Shape("128 in / 128 out", 128, 128), Shape("1024 in / 64 out", 1024, 64)]
CONCURRENCIES = [1, 4, 16, 64]


def corpus_words() -> list[str]:
    from mstriton.demo.corpus import build_corpus

    return build_corpus().split()


def exact_prompt(tokenizer: TextTokenizer, words: list[str], length: int, rng: random.Random) -> str:
    """A text of `length` tokens, from a random start in `words`: words are added while the count stays
    at or below `length`, then single characters fill the last few tokens."""
    start = rng.randrange(len(words))
    text = ""
    i = start
    while True:
        candidate = (text + " " + words[i % len(words)]).strip()
        if len(tokenizer.encode(candidate)) > length:
            break
        text, i = candidate, i + 1
    fillers = "abcdefghijklmnopqrstuvwxyz"
    while len(tokenizer.encode(text)) < length:
        text += " " + rng.choice(fillers)
        if len(tokenizer.encode(text)) > length:
            text = text[:-2]
            break
    if len(tokenizer.encode(text)) != length:
        raise ValueError(f"could not build a prompt of exactly {length} tokens (got {len(tokenizer.encode(text))})")
    return text


def make_prompts(tokenizer: TextTokenizer | str | Path, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` different prompts of exactly `length` tokens of `tokenizer` (a TextTokenizer, or what
    load_tokenizer takes: a tokenizer.model or tokenizer.json file, or the folder holding one)."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    words, rng = corpus_words(), random.Random(seed)
    prompts = []
    while len(prompts) < count:
        try:
            prompts.append(exact_prompt(tokenizer, words, length, rng))
        except ValueError:
            continue  # this start ran into a token that jumps past the length; another start will do
    return prompts
