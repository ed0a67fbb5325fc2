"""Sentencepiece tokenization, prompt templates, and incremental detokenization that never breaks text.

Incremental detokenization is stateless, so a Triton model can run it for any stream without memory: a piece
is computed from a short window of the stream's latest token ids. The piece for token n is
    visible(decode(window[:n])) minus visible(decode(window[:n-1]))
where `visible` holds back a trailing U+FFFD (the bytes of a character not yet complete). Both decodes start at
the same token, so sentencepiece treats the window's first token alike in both (its leading-space rule, a
character cut at the window start), and the pieces of a stream join to exactly the text of the whole output:
spaces kept, multi-byte UTF-8 (Chinese, emoji) never split.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

# Tokens of context before the newest token: enough to hold one complete character of byte-fallback tokens
# (at most 4 bytes) plus the token before it, whose leading space decides how the window starts.
DETOKENIZE_WINDOW = 8
REPLACEMENT = "\ufffd"

TEMPLATES = {
    "none": "{prompt}",
    "llama2": "[INST] {prompt} [/INST]",
    "internlm": "<|User|>:{prompt}<eoh>\n<|Bot|>:",
}


class TemplateError(ValueError):
    pass


def apply_template(template: str, prompt: str) -> str:
    if template not in TEMPLATES:
        raise TemplateError(f"prompt template must be one of {sorted(TEMPLATES)}, got {template!r}")
    return TEMPLATES[template].format(prompt=prompt)


class Tokenizer:
    def __init__(self, model_file: str | Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_bos and self.bos_id >= 0 else ids

    def decode(self, ids) -> str:
        # Models often pad their vocabulary past the tokenizer's (e.g. to a multiple of 64): such ids have no
        # text, and must not fail the stream.
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def encode_words(self, words: list[str]) -> list[list[int]]:
        """Stop/bad words to token sequences, tokenized as they appear after other text (no BOS)."""
        return [self.sp.encode(w) for w in words if w]

    def piece(self, window: list[int], final: bool = False, new: int = 1) -> str:
        """The new text of the stream's `new` newest tokens, from `window`: the stream's last (up to
        DETOKENIZE_WINDOW + new) token ids, the newest last. `final` releases any held-back bytes."""
        before = self.decode(window[:-new])
        after = self.decode(window)
        shown_before = _visible(before)
        shown_after = after if final else _visible(after)
        if not shown_after.startswith(shown_before):
            # Not expected from sentencepiece; give the longest safe answer rather than repeat text.
            common = 0
            while common < min(len(shown_before), len(shown_after)) and \
                    shown_before[common] == shown_after[common]:
                common += 1
            return shown_after[common:]
        return shown_after[len(shown_before):]


def _visible(text: str) -> str:
    """Text without trailing replacement characters: bytes of a character still arriving."""
    return text.rstrip(REPLACEMENT)


def stream_window(ids: list[int], new: int = 1) -> list[int]:
    """The window `Tokenizer.piece` needs for the `new` newest of `ids`."""
    return ids[-(DETOKENIZE_WINDOW + new):]
