"""Our Hugging Face tokenizer path on a real byte-level BPE tokenizer (SmolLM2's, rebuilt from its GGUF file):
streaming pieces join to the decode of all tokens with UTF-8 never split, special tokens are left out unless
asked for, and our chat rendering and its token ids equal transformers' apply_chat_template."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mstriton.pretrained import smollm2_gguf
from mstriton.tokenizer import ChatTemplate, HFTokenizer, load_tokenizer, stream_window, validate_messages

TEXTS = ["Streaming keeps every space,   and  every word\tarrives whole.\n\nNext line.",
         "MindSpore 图模式 在 Triton 上 流式 输出 中文 文本。", "Emoji too: 🚀 launches, 🎉 celebrates, 👍🏽 agrees.",
         "Numbers 3.14159 and 12345, symbols #@!& and a  2 after two spaces."]
CONVERSATIONS = {
    "no system message": [{"role": "user", "content": "What is the capital of France?"}],
    "system message": [{"role": "system", "content": "You are a pirate."},
                       {"role": "user", "content": "Say hello."}],
    "several turns": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
                      {"role": "assistant", "content": "Hello! 你好"}, {"role": "user", "content": "2 + 2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from mstriton.model.gguf import open_reader
    from mstriton.model.gguf_tokenizer import tokenizer_files

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    for name, text in tokenizer_files(open_reader(smollm2_gguf())).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def ours(folder) -> HFTokenizer:
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def stream(tokenizer, ids, interval=1, skip_special_tokens=True) -> list[str]:
    ends = sorted({1, *range(1 + interval, len(ids), interval), len(ids)})
    return [tokenizer.piece(stream_window(ids[:end], end - start), final=(end == len(ids)), new=end - start,
                            skip_special_tokens=skip_special_tokens) for start, end in zip([0] + ends, ends)]


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_a_text_joins_to_the_text_and_never_splits_a_character(ours, text, interval):
    ids = ours.encode(text)
    pieces = stream(ours, ids, interval)
    assert "".join(pieces) == ours.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), pieces
    if not text.isascii() and interval == 1:
        assert any(p == "" for p in pieces)  # some byte tokens were held back until their character completed


def test_random_token_streams_join_to_the_whole_decode(ours):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(0, ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(ours, ids)) == ours.decode(ids)
        assert "".join(stream(ours, ids, skip_special_tokens=False)) == ours.decode(ids, skip_special_tokens=False)


def test_special_tokens_are_left_out_of_the_text_unless_asked(ours):
    ids = ours.encode("<|im_start|>assistant\nParis<|im_end|>")
    assert ours.decode(ids) == "assistant\nParis"
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nParis<|im_end|>"
    assert (ours.bos_id, ours.eos_id) == (1, 2) and ours.special_tokens["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_rendering_and_ids_equal_apply_chat_template(ours, theirs, name):
    messages = CONVERSATIONS[name]
    rendered = ChatTemplate(ours.chat_template, ours.special_tokens).render(messages)
    assert rendered == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ours.encode_rendered(rendered) == list(want)


# ---- templates that write tools in a syntax of their own -------------------------------------------------------

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TOOL_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo and Köln?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                  {"id": "call_2", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Köln"}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "4 °C"},
              {"role": "tool", "tool_call_id": "call_2", "content": "7 °C"}]


@pytest.mark.parametrize("template, tool_format", [("hermes_tools.jinja", "hermes"),
                                                   ("llama3_tools.jinja", "llama3_json")])
def test_tools_and_earlier_calls_render_as_apply_chat_template_renders_them(ours, theirs, template, tool_format):
    from mstriton.frontend.native_tools import with_template_calls
    from mstriton.tokenizer.chat import tool_format_of

    source = (TEMPLATES / template).read_text()
    assert tool_format_of(source) == tool_format
    messages = validate_messages([with_template_calls(m) for m in TOOL_TURNS])
    rendered = ChatTemplate(source, ours.special_tokens).render(messages, tools=[WEATHER])
    assert rendered == theirs.apply_chat_template(messages, tools=[WEATHER], chat_template=source,
                                                  add_generation_prompt=True, tokenize=False)
    assert '"get_weather"' in rendered and "Köln" in rendered and "7 °C" in rendered
    without = ChatTemplate(source, ours.special_tokens).render(messages[:2])
    assert without == theirs.apply_chat_template(messages[:2], chat_template=source, add_generation_prompt=True,
                                                 tokenize=False)
    assert "get_weather" not in without


def test_templates_without_a_tool_syntax_get_the_generic_format(ours):
    from mstriton.tokenizer.chat import NAMED_TEMPLATES, tool_format_of

    assert tool_format_of(ours.chat_template) == "generic"  # SmolLM2's ChatML
    assert {tool_format_of(t) for t in NAMED_TEMPLATES.values()} == {"generic"}
    assert tool_format_of("{% for t in tools %}[TOOLS]{{ t | tojson }}{% endfor %}") == "generic"  # unknown syntax
