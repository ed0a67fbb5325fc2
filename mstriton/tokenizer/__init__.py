"""Tokenizers the models are served with: sentencepiece (tokenizer.model) and Hugging Face (tokenizer.json),
chat templates, and streaming detokenization shared by both."""

from __future__ import annotations

from pathlib import Path

from .base import TextTokenizer, TokenizerError
from .chat import NAMED_TEMPLATES, ChatTemplate, TemplateError, validate_messages
from .detokenize import DETOKENIZE_WINDOW, stream_window
from .hf_tokenizer import TOKENIZER_JSON, HFTokenizer
from .sentencepiece_tokenizer import SentencePieceTokenizer

SENTENCEPIECE_MODEL = "tokenizer.model"

__all__ = ["ChatTemplate", "DETOKENIZE_WINDOW", "HFTokenizer", "NAMED_TEMPLATES", "SENTENCEPIECE_MODEL",
           "SentencePieceTokenizer", "TOKENIZER_JSON", "TemplateError", "TextTokenizer", "TokenizerError",
           "load_tokenizer", "stream_window", "validate_messages"]


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A folder (tokenizer.json wins over tokenizer.model, as in transformers' fast tokenizers), or one file."""
    path = Path(path)
    if path.is_dir():
        if (path / TOKENIZER_JSON).is_file():
            return HFTokenizer(path)
        if (path / SENTENCEPIECE_MODEL).is_file():
            return SentencePieceTokenizer(path / SENTENCEPIECE_MODEL)
        raise TokenizerError(f"{path} holds neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}")
    if path.name == TOKENIZER_JSON:
        return HFTokenizer(path.parent)
    if path.is_file():
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"no tokenizer at {path}")
