"""A sentencepiece model (tokenizer.model): the demo model's and LLaMA 1/2's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from .base import TextTokenizer


class SentencePieceTokenizer(TextTokenizer):
    def __init__(self, model_file: str | Path, chat_template: str | None = None):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.special_tokens = {name: self.sp.id_to_piece(i) for name, i in
                               (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.sp.unk_id()))
                               if i is not None and i >= 0}
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_special_tokens and self.bos_id is not None else ids

    def encode_rendered(self, text: str) -> list[int]:
        # sentencepiece does not parse control tokens written in text, so templates for it never write BOS:
        # the tokenizer adds it, as for any prompt.
        return self.encode(text, add_special_tokens=True)

    def token_texts(self):
        # pieces as they are written, "▁" standing for a space (byte pieces are written "<0xE4>": longer than
        # their byte, which is fine). Sentencepiece also merges a run of unknown characters into one <unk> and
        # collapses runs of spaces: for text made of those, a token stands for more than this.
        return (self.sp.id_to_piece(i).replace("\u2581", " ") for i in range(self.vocab_size))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # sentencepiece's decode leaves out control tokens (BOS, EOS) either way.
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])
