"""What every tokenizer the models are served with offers: text <-> ids, stop words, streaming pieces."""

from __future__ import annotations

import abc
import functools
from typing import Iterable, Sequence

from . import detokenize


class TokenizerError(ValueError):
    """A tokenizer file or folder that cannot be served; the message names the file and the field."""


class TextTokenizer(abc.ABC):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    # Strings the chat template may use: bos_token, eos_token, unk_token, pad_token (those the tokenizer has).
    special_tokens: dict[str, str]
    # The model's own chat template (jinja2 source), if its tokenizer files carry one.
    chat_template: str | None

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the tokenizer adds to a whole prompt (BOS)."""

    @abc.abstractmethod
    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a prompt rendered by a chat template, with BOS handled as transformers'
        apply_chat_template does for this kind of tokenizer."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids past the tokenizer's vocabulary (models pad theirs) have no text, never fail."""

    @abc.abstractmethod
    def token_texts(self) -> Iterable[str]:
        """Each token's text, as long as any text it stands for (longer is fine, shorter is not)."""

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token stands for: a prompt of n bytes is at least
        n / max_token_bytes tokens long (see params.check_prompt_fits). Computed once (0.15 s for SmolLM2's
        49152 tokens)."""
        return max(len(t.encode("utf-8", "surrogatepass")) for t in self.token_texts())

    def encode_words(self, words: list[str]) -> list[list[int]]:
        """Stop/bad words to token sequences, tokenized as they appear after other text (no BOS). A word that
        tokenizes to nothing (sentencepiece drops a lone space) is left out: it can never be produced or matched,
        and an empty bad word once killed the decode loop (IndexError in its ban)."""
        return [ids for ids in (self.encode(w, add_special_tokens=False) for w in words if w) if ids]

    def piece(self, window: Sequence[int], final: bool = False, new: int = 1,
              skip_special_tokens: bool = True) -> str:
        """The new text of a stream's `new` newest tokens (see detokenize.piece)."""
        return detokenize.piece(lambda ids: self.decode(ids, skip_special_tokens), window, final, new)
