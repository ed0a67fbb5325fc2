"""Chat requests: message validation (errors name the field), named templates over several turns, and the
request parser's text_input / messages rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstriton.params import ParameterError
from mstriton.serving.requests import parse_request
from mstriton.tokenizer import ChatTemplate, TemplateError, validate_messages

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]


@pytest.mark.parametrize("value, field", [
    ("not json", "messages"), ('{"role": "user"}', "messages"), ("[]", "messages"),
    ([["user", "hi"]], r"messages\[0\]"), ([{"role": "wizard", "content": "x"}], r"messages\[0\].role"),
    ([{"role": "user"}], r"messages\[0\].content"), ([{"role": "user", "content": 5}], r"messages\[0\].content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\].content\[0\]"),
])
def test_bad_messages_are_refused_by_name(value, field):
    with pytest.raises(ParameterError, match=field):
        validate_messages(value)


def test_messages_accept_json_text_and_openai_text_parts():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert validate_messages(json.dumps(parts)) == [{"role": "user", "content": "ab"}]


def test_chatml_renders_every_turn_and_the_generation_prompt():
    text = ChatTemplate.named("chatml").render(CHAT)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_llama2_puts_the_system_prompt_in_the_first_instruction():
    text = ChatTemplate.named("llama2").render(CHAT)
    assert text == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! [INST] Capital of France? [/INST]"


def test_template_helpers_match_transformers_environment():
    template = ChatTemplate("{{ messages[0]['content'] | tojson }}{% if messages|length > 1 %}"
                            "{{ raise_exception('one message only') }}{% endif %}{{ bos_token }}", {"bos_token": "<s>"})
    assert template.render([{"role": "user", "content": "é"}]) == '"é"<s>'
    with pytest.raises(ParameterError, match="one message only"):
        template.render(CHAT)
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def inputs(**arrays):
    return lambda name: arrays.get(name)


def test_request_is_text_or_messages_never_both_nor_neither():
    chat = np.array([[json.dumps(CHAT[1:2]).encode()]], dtype=object)
    parsed = parse_request(inputs(messages=chat))
    assert parsed.messages == CHAT[1:2] and parsed.text == ""
    with pytest.raises(ParameterError, match="not both"):
        parse_request(inputs(messages=chat, text_input=np.array([[b"hi"]], dtype=object)))
    with pytest.raises(ParameterError, match="'text_input' is required.*'messages'"):
        parse_request(inputs())
    assert parse_request(inputs(), {"messages": CHAT}).messages == CHAT  # HTTP generate's parameters


def test_skip_special_tokens_is_a_request_setting():
    text = np.array([[b"hi"]], dtype=object)
    assert parse_request(inputs(text_input=text)).params.skip_special_tokens is True
    assert parse_request(inputs(text_input=text, skip_special_tokens=np.array([[False]]))).params \
        .skip_special_tokens is False
