"""The request path's steps as plain functions over numpy and Python values: what the tokenizer and sampler
models run, and what the unit tests call directly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..params import GenerationParams, ParameterError
from ..tokenizer import Tokenizer, apply_template


@dataclasses.dataclass
class EncodedPrompt:
    ids: list[int]
    params_dict: dict           # the validated parameters, defaults filled in
    words: dict                 # {"stop": [[ids]], "bad": [[ids]], "end_ids": [ids]}


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, *, template: str, max_seq_len: int, vocab_size: int,
                 eos_id: int | None):
        self.tokenizer, self.template = tokenizer, template
        self.max_seq_len, self.vocab_size, self.eos_id = max_seq_len, vocab_size, eos_id
        apply_template(template, "")  # fail at load on an unknown template

    @classmethod
    def from_config_parameters(cls, version_dir: Path, parameters: dict) -> "PromptEncoder":
        def value(key, default=None):
            return parameters.get(key, {}).get("string_value", default)

        eos = value("eos_id")
        return cls(Tokenizer(Path(version_dir) / value("tokenizer", "tokenizer.model")),
                   template=value("template", "none"), max_seq_len=int(value("max_seq_len")),
                   vocab_size=int(value("vocab_size")), eos_id=int(eos) if eos not in (None, "") else None)

    def encode(self, text: str, params: GenerationParams) -> EncodedPrompt:
        ids = self.tokenizer.encode(apply_template(self.template, text))
        room = self.max_seq_len - len(ids)
        if room < 1:
            raise ParameterError(f"'text_input' is {len(ids)} tokens long; prompts must be shorter than "
                                 f"max_seq_len={self.max_seq_len} tokens (at most {self.max_seq_len - 1})")
        params.validate(max_new_tokens_limit=room, vocab_size=self.vocab_size)
        end_ids = [params.end_id] if params.end_id is not None else \
            ([self.eos_id] if self.eos_id is not None else [])
        words = {"stop": self.tokenizer.encode_words(params.stop_words),
                 "bad": self.tokenizer.encode_words(params.bad_words), "end_ids": end_ids}
        return EncodedPrompt(ids=ids, params_dict=dataclasses.asdict(params), words=words)
