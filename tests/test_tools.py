"""Tool calls in the generic JSON format, without a server: the request's tools and tool_choice (and their
refusals, naming the field), the grammar's schema, the answer read back (whole, and streamed in pieces of any
size: deltas that assemble to the whole), earlier calls written back into the chat."""

from __future__ import annotations

import json

import jsonschema
import pytest

from mstriton.frontend.errors import ApiError
from mstriton.frontend.fields import Fields
from mstriton.frontend.native_tools import in_format, with_template_calls
from mstriton.frontend.tools import ToolRequest, ToolStream, parse, with_generic_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "the time"}}
ANSWERS = [
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Os\\"lo} ]"}}, '
    '{"name": "get_time", "arguments": {}}]}',
    '{"tool_call": {"name": "get_weather", "arguments": {"city": "Kyiv", "days": [1, {"a": "}"}]}}}',
    '{"response": "caf\\u00e9 \\ud83d\\ude00 \\"quoted\\" back\\\\slash\\nline"}',
]


def request(**body):
    return ToolRequest.from_body(Fields(body))


def test_tool_choice_shapes_the_schema_the_answer_must_follow():
    auto = request(tools=[WEATHER, TIME])
    assert auto.choice == "auto" and auto.parallel
    schema = auto.schema()
    jsonschema.validate(json.loads(ANSWERS[0]), schema)
    jsonschema.validate(json.loads(ANSWERS[2]), schema)
    with pytest.raises(jsonschema.ValidationError):  # a tool that does not exist
        jsonschema.validate({"tool_calls": [{"name": "other", "arguments": {}}]}, schema)
    required = request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    jsonschema.validate({"tool_call": {"name": "get_time", "arguments": {}}}, required.schema())
    with pytest.raises(jsonschema.ValidationError):  # no words when a call is required
        jsonschema.validate(json.loads(ANSWERS[2]), required.schema())
    named = request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_call": {"name": "get_time", "arguments": {}}}, named.schema())
    assert "get_time" not in named.instruction() and "You must call a tool" in named.instruction()
    assert request(tools=[WEATHER], tool_choice="none") is None and request() is None


@pytest.mark.parametrize("body, field", [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": [1]}}]}, "tools[0].function.parameters"),
])
def test_bad_tools_are_refused_naming_the_field(body, field):
    with pytest.raises(ApiError) as raised:
        ToolRequest.from_body(Fields(body))
    assert raised.value.status == 400 and raised.value.param == field


def test_answers_are_read_back_into_openai_tool_calls():
    content, calls = parse(ANSWERS[0])
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": 'Os"lo} ]'}
    assert parse(ANSWERS[2]) == (json.loads(ANSWERS[2])["response"], [])
    assert parse('{"tool_calls": [{"name": "get_w') == ('{"tool_calls": [{"name": "get_w', [])  # cut short


def assembled(stream, answer: str, step: int) -> tuple[str, dict[int, dict], bool]:
    """`answer` fed to `stream` `step` characters at a time: the content deltas joined, each call's name and
    arguments as a client assembles them, and whether it called."""
    deltas = []
    for i in range(0, len(answer), step):
        deltas += stream.feed(answer[i:i + step])
    left, called = stream.finish()
    deltas += left
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.index is None:
            continue
        entry = calls.setdefault(d.index, {"name": None, "arguments": ""})
        if d.id is not None:
            assert entry["name"] is None and d.id.startswith("call_")  # id and name come once, first
            entry["name"] = d.name
        entry["arguments"] += d.arguments or ""
    return "".join(d.content for d in deltas if d.content is not None), calls, called


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streamed_deltas_assemble_to_the_whole_answer(answer, step):
    content, calls, called = assembled(ToolStream(), answer, step)
    whole_content, whole_calls = parse(answer)
    assert called == bool(whole_calls)
    assert (content or None) == whole_content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole_calls]


def test_text_that_never_became_an_answer_object_is_content_at_the_end():
    stream = ToolStream()
    assert stream.feed('{"tool') == []
    assert [d.content for d in stream.finish()[0]] == ['{"tool']


def test_earlier_calls_are_written_into_the_chat_in_the_generic_format():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    message = with_generic_calls({"role": "assistant", "content": None, "tool_calls": [call]})
    assert json.loads(message["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    chat = request(tools=[WEATHER]).messages([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "hi"}])
    assert chat[0]["content"].startswith("Be brief.\n\nYou can call these tools:") and len(chat) == 2


# ---- tool calls in the syntax of the model's own template (native_tools.py) ---------------------------------

HERMES_ANSWERS = [
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os\\"lo</tool_call>"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Kyiv"}}\n</tool_call>',
    'No tool needed: it is 4 <tool degrees, and < tool_call> is not a tag.',
    '<tool_call>\nnot json\n</tool_call>',       # a block that is no call: all of it is words
    'Cut short <tool_call>\n{"name": "get_w',    # never closed: words at the end
]
LLAMA3_ANSWERS = ['{"name": "get_weather", "parameters": {"city": "Kyiv", "days": [1, {"a": "}"}]}}',
                  '<|python_tag|>{"name": "get_time", "parameters": {}}', "It is sunny in {Kyiv}.",
                  '{"no": "call"}', '  {"name": "get_w']


def native(tool_format, **body):
    return in_format(request(tools=[WEATHER, TIME], **body), tool_format)


def test_hermes_answers_are_read_back_with_the_words_around_them():
    hermes = native("hermes")
    content, calls = hermes.parse(HERMES_ANSWERS[0])
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": 'Os"lo</tool_call>'}
    for text in HERMES_ANSWERS[2:]:
        assert hermes.parse(text) == (text, [])


def test_llama3_json_answers_are_one_call_or_words():
    llama3 = native("llama3_json")
    content, [call] = llama3.parse(LLAMA3_ANSWERS[1])
    assert content is None and call["function"] == {"name": "get_time", "arguments": "{}"}
    for text in LLAMA3_ANSWERS[2:]:
        assert llama3.parse(text) == (text, [])
    assert llama3.parallel is False  # the template's syntax has one call per answer


@pytest.mark.parametrize("tool_format, answer", [("hermes", a) for a in HERMES_ANSWERS] +
                                                [("llama3_json", a) for a in LLAMA3_ANSWERS])
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_native_streamed_deltas_assemble_to_the_whole_answer(tool_format, answer, step):
    tools = native(tool_format)
    content, calls, called = assembled(tools.stream(), answer, step)
    whole_content, whole_calls = tools.parse(answer)
    assert called == bool(whole_calls)
    assert (content.strip() or None) == (whole_content.strip() if whole_content else None)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole_calls]


def test_native_formats_give_the_template_the_tools_and_hold_only_forced_choices_to_a_grammar():
    hermes = native("hermes")
    assert hermes.structured_outputs() is None  # auto: the model may answer in words
    assert [t["function"]["name"] for t in hermes.template_tools()] == ["get_weather", "get_time"]
    chat = [{"role": "user", "content": "hi"}]
    assert hermes.messages(chat) == chat  # no instruction: the template describes the tools
    named = native("hermes", tool_choice={"type": "function", "function": {"name": "get_time"}})
    grammar = named.structured_outputs()["grammar"]
    assert '"const": "get_time"' in grammar and "get_weather" not in grammar
    assert len(named.template_tools()) == 2  # the model is still told of every tool
    assert '"parameters"' in native("llama3_json", tool_choice="required").structured_outputs()["grammar"]
    assert request(tools=[WEATHER]).template_tools() is None  # generic: the instruction describes them


def test_earlier_calls_are_given_to_a_native_template_in_openais_form():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    message = with_template_calls({"role": "assistant", "content": None, "tool_calls": [call]})
    assert message["content"] == "" and message["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert message["tool_calls"][0]["id"] == "call_1"


# ---- the Responses API's body, read into the chat request it stands for ----------------------------------------

def test_a_responses_body_is_the_chat_request_it_stands_for():
    from mstriton.frontend.responses_api import chat_body

    body = Fields({"model": "m", "instructions": "Be brief.", "max_output_tokens": 7, "temperature": 0.5,
                   "input": [{"role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
                             {"role": "user", "content": "hi"},
                             {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
                             {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
                             {"type": "function_call_output", "call_id": "call_1", "output": "ok"}],
                   "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                   "tool_choice": {"type": "function", "name": "f"},
                   "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}})
    chat = chat_body(body)
    assert [m["role"] for m in chat["messages"]] == ["system", "system", "user", "assistant", "tool"]
    assert [c["id"] for c in chat["messages"][3]["tool_calls"]] == ["call_1", "call_2"]  # one turn
    assert chat["max_tokens"] == 7 and chat["temperature"] == 0.5
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["response_format"]["json_schema"]["schema"] == {"type": "object"}


@pytest.mark.parametrize("body, field", [
    ({"input": []}, "input"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "image", "url": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0]"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
])
def test_bad_responses_bodies_are_refused_naming_their_own_fields(body, field):
    from mstriton.frontend.responses_api import chat_body

    with pytest.raises(ApiError) as raised:
        chat_body(Fields(body))
    assert raised.value.param == field
