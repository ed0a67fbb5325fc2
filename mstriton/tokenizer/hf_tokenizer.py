"""A Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json), served through the `tokenizers`
library: byte-level BPE (Llama 3, Qwen2, SmolLM), and sentencepiece-style BPE saved as tokenizer.json (Mistral).

Added and special tokens are the folder's own: tokenizer.json lists them (and `tokenizers` finds them when they
are written in a text, as transformers does); tokenizer_config.json names bos/eos/unk/pad and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from .base import TextTokenizer, TokenizerError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers save the template
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_json(path: Path) -> dict:
    """A JSON file of a model folder; {} when the folder has none (every such file is optional)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc


def chat_template_of(folder: Path, tokenizer_config: dict) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or
    a list of named templates of which 'default' is the one apply_chat_template uses)."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


class HFTokenizer(TextTokenizer):
    def __init__(self, folder: str | Path, chat_template: str | None = None):
        folder = Path(folder)
        if not (folder / TOKENIZER_JSON).is_file():
            raise TokenizerError(f"{folder} has no {TOKENIZER_JSON}")
        try:
            self.tk = Tokenizer.from_file(str(folder / TOKENIZER_JSON))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions for bad files
            raise TokenizerError(f"{folder / TOKENIZER_JSON} cannot be read by the tokenizers library: {exc}") \
                from exc
        config = read_json(folder / TOKENIZER_CONFIG)
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name))
            if text is not None:
                if self.tk.token_to_id(text) is None:
                    raise TokenizerError(f"{folder / TOKENIZER_CONFIG}: '{name}' is {text!r}, which is not a token "
                                         f"of {TOKENIZER_JSON}")
                self.special_tokens[name] = text
        self.bos_id = self._id_of("bos_token")
        self.eos_id = self._id_of("eos_token")
        self.chat_template = chat_template if chat_template is not None else chat_template_of(folder, config)

    def _id_of(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.tk.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_rendered(self, text: str) -> list[int]:
        # transformers' apply_chat_template tokenizes the rendered text with add_special_tokens=False: a template
        # that wants BOS writes {{ bos_token }} itself, and it is parsed here as the special token it is.
        return self.encode(text, add_special_tokens=False)

    def token_texts(self):
        # each token decoded alone (a byte of a longer character comes out as U+FFFD: 3 bytes, never fewer), and
        # a space before it, which a decoder may drop at the start of a text
        return (" " + t for t in self.tk.decode_batch([[i] for i in range(self.vocab_size)],
                                                        skip_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size],
                              skip_special_tokens=skip_special_tokens)
