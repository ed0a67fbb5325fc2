"""Incremental detokenization that never breaks text, for any tokenizer with a `decode(ids)`.

It is stateless, so a Triton model can run it for any stream without memory: a piece is computed from a short
window of the stream's latest token ids. The piece for the newest token(s) is
    visible(decode(window)) minus visible(decode(window without its newest tokens))
where `visible` holds back a trailing U+FFFD (the bytes of a character not yet complete). Both decodes start at
the same token, so the tokenizer treats the window's first token alike in both (sentencepiece's leading-space
rule, a character cut at the window start, byte-level BPE's partial bytes), and the pieces of a stream join to
exactly the text of the whole output: spaces kept, multi-byte UTF-8 (Chinese, emoji) never split.
"""

from __future__ import annotations

from typing import Callable, Sequence

# Tokens of context before the newest token: enough to hold one complete character spread over byte tokens (at
# most 4 bytes, in sentencepiece's byte fallback or byte-level BPE) plus the token before it, whose leading
# space decides how the window starts.
DETOKENIZE_WINDOW = 8
REPLACEMENT = "\ufffd"


def visible(text: str) -> str:
    """Text without trailing replacement characters: bytes of a character still arriving."""
    return text.rstrip(REPLACEMENT)


def stream_window(ids: Sequence[int], new: int = 1) -> list[int]:
    """The window `piece` needs for the `new` newest of `ids`."""
    return list(ids[-(DETOKENIZE_WINDOW + new):])


def piece(decode: Callable[[Sequence[int]], str], window: Sequence[int], final: bool = False, new: int = 1) -> str:
    """The new text of the stream's `new` newest tokens, from `window` (see stream_window); `final` releases any
    held-back bytes (with `new` = 0, only those)."""
    shown_before = visible(decode(window[:len(window) - new]))
    after = decode(window)
    shown_after = after if final else visible(after)
    if not shown_after.startswith(shown_before):
        # Not expected of the tokenizers we serve; give the longest safe answer rather than repeat text.
        common = 0
        while common < min(len(shown_before), len(shown_after)) and shown_before[common] == shown_after[common]:
            common += 1
        return shown_after[common:]
    return shown_after[len(shown_before):]
