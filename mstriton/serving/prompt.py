"""A request's prompt to token ids, as plain functions over Python values: what the tokenizer model runs (chat
template, stop and bad words to ids, the checks that need the prompt's length), and what the unit tests call
directly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..params import GenerationParams, ParameterError, template_tools
from ..tokenizer import ChatTemplate, TextTokenizer, load_tokenizer, validate_messages
# Beside the tokenizer files in the tokenizer model's folder: the chat template requests with `messages` are
# rendered with (the one named at conversion, else the model's own).
from ..tokenizer.hf_tokenizer import CHAT_TEMPLATE_FILE


@dataclasses.dataclass
class EncodedPrompt:
    ids: list[int]
    params_dict: dict           # the validated parameters, defaults filled in
    words: dict                 # {"stop": [[ids]], "bad": [[ids]], "end_ids": [ids]}


class PromptEncoder:
    """A prompt (`text_input`, or chat `messages`) -> token ids, and the checks that need its length.

    `wrap_text`: a text_input is rendered as one user message through the chat template (the llama2 / internlm /
    chatml templates named at conversion); otherwise it is tokenized as it is, as a completion prompt."""

    def __init__(self, tokenizer: TextTokenizer, *, chat: ChatTemplate | None, wrap_text: bool, max_seq_len: int,
                 vocab_size: int, end_ids: list[int]):
        if wrap_text and chat is None:
            raise ValueError("a prompt template wraps text_input only through a chat template")
        self.tokenizer, self.chat, self.wrap_text = tokenizer, chat, wrap_text
        self.max_seq_len, self.vocab_size, self.end_ids = max_seq_len, vocab_size, list(end_ids)

    @classmethod
    def from_config_parameters(cls, version_dir: Path, parameters: dict) -> "PromptEncoder":
        def value(key, default=None):
            return parameters.get(key, {}).get("string_value", default)

        version_dir = Path(version_dir)
        tokenizer = load_tokenizer(version_dir / value("tokenizer", "tokenizer.model"))
        chat_file = version_dir / CHAT_TEMPLATE_FILE
        chat = ChatTemplate(chat_file.read_text(encoding="utf-8"), tokenizer.special_tokens) \
            if chat_file.is_file() else None
        end_ids = value("end_ids", value("eos_id", ""))  # eos_id: repositories converted before end_ids
        return cls(tokenizer, chat=chat, wrap_text=value("template", "none") != "none",
                   max_seq_len=int(value("max_seq_len")), vocab_size=int(value("vocab_size")),
                   end_ids=[int(i) for i in end_ids.split(",") if i.strip()])

    def prompt_ids(self, text: str, messages=None, tools: list[dict] | None = None) -> list[int]:
        if messages is not None:
            if self.chat is None:
                raise ParameterError("'messages' needs a chat template, and this model has none: convert it with "
                                     "--template (chatml, llama2, internlm, or a .jinja file), or send text_input")
            return self.tokenizer.encode_rendered(self.chat.render(validate_messages(messages), tools=tools))
        if self.wrap_text:
            return self.tokenizer.encode_rendered(self.chat.render([{"role": "user", "content": text}]))
        return self.tokenizer.encode(text)

    def encode(self, text: str, params: GenerationParams, messages=None) -> EncodedPrompt:
        ids = self.prompt_ids(text, messages, template_tools(params.tools) if params.tools else None)
        field = "messages" if messages is not None else "text_input"
        room = self.max_seq_len - len(ids)
        if room < 1:
            raise ParameterError(f"'{field}' is {len(ids)} tokens long; prompts must be shorter than "
                                 f"max_seq_len={self.max_seq_len} tokens (at most {self.max_seq_len - 1})")
        params.validate(max_new_tokens_limit=room, vocab_size=self.vocab_size)
        end_ids = [params.end_id] if params.end_id is not None else self.end_ids
        # stop_token_ids end a generation as the end ids do (and, as in vLLM, not before min_tokens)
        end_ids = end_ids + [t for t in params.stop_token_ids if t not in end_ids]
        words = {"stop": self.tokenizer.encode_words(params.stop_words),
                 "bad": self.tokenizer.encode_words(params.bad_words), "end_ids": end_ids}
        # the tools are in the prompt now: the decode step has no use for them
        return EncodedPrompt(ids=ids, params_dict={**dataclasses.asdict(params), "tools": None}, words=words)
