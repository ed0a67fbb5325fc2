"""Structured output and tool calls through every door, against the real tritonserver serving SmolLM2 and the
frontend, driven by the `openai` SDK, huggingface_hub (TGI's grammar) and tritonclient (the structured_outputs
input). Answers are checked by jsonschema (a validator nobody here wrote), for many prompts and seeds; tool
choices that are required always give a valid call; streamed tool calls assemble to the non-streamed ones; a
grammar request batched with plain ones leaves their greedy text unchanged; bad grammars are 400s naming the
field while the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import numpy as np
import pytest

from test_smollm2_server import grpc_stream

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string", "maxLength": 20}},
          "required": ["name", "age", "city"], "additionalProperties": False}
PROMPTS = ["Describe a person who lives in Paris as JSON.", "Invent a character for a story, as JSON.",
           "Give me the details of a famous scientist in JSON.", "A new employee joined today. Describe them."]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ARGUMENT_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def frontend(smollm2_server, tmp_path_factory):
    from mstriton.server_process import running_frontend

    with running_frontend(smollm2_server, tmp_path_factory.mktemp("frontend") / "frontend.log") as fe:
        yield fe


@pytest.fixture(scope="module")
def client(frontend):
    import openai
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)


def ask(client, prompt, **kwargs):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=kwargs.pop("max_tokens", 96), **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_answers_validate_for_many_prompts_and_seeds(client, seed):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for prompt in PROMPTS:
        answer = ask(client, prompt, response_format=response_format, temperature=1.0, seed=seed)
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_each_of_n_sampled_answers_keeps_to_the_schema(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answer = ask(client, PROMPTS[1], response_format=response_format, temperature=1.0, seed=11, n=2)
    assert len(answer.choices) == 2
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_regex_choice_and_grammar_through_the_vllm_fields(client):
    answer = ask(client, "Give me a JSON object about cats.", response_format={"type": "json_object"},
                 max_tokens=120)
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    answer = ask(client, "What is the date?", extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]", answer.choices[0].message.content)
    answer = ask(client, "Is the sky blue?", extra_body={"guided_choice": ["yes", "no", "sometimes"]})
    assert answer.choices[0].message.content in ("yes", "no", "sometimes")
    gbnf = 'root ::= "[" item (", " item)* "]"\nitem ::= [0-9]{1,3}'
    answer = ask(client, "List some numbers.", extra_body={"guided_grammar": gbnf}, max_tokens=40)
    text = answer.choices[0].message.content
    assert re.fullmatch(r"\[[0-9]{1,3}(, [0-9]{1,3})*\]?", text) or answer.choices[0].finish_reason == "length", text
    completion = client.completions.create(model="smollm2", prompt="The answer is", max_tokens=10,
                                           extra_body={"guided_regex": "(yes|no)!"})
    assert completion.choices[0].text in ("yes!", "no!")


def test_tgi_grammar_through_huggingface_hub(frontend):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=frontend.url)
    text = client.text_generation("A person described in JSON:", max_new_tokens=96,
                                  grammar={"type": "json", "value": PERSON})
    jsonschema.validate(json.loads(text), PERSON)
    text = client.text_generation("The year was", max_new_tokens=10, grammar={"type": "regex", "value": "1[89][0-9]{2}"})
    assert re.fullmatch("1[89][0-9]{2}", text)


def test_the_structured_outputs_input_over_grpc(smollm2_server):
    spec = {"json": PERSON}
    pieces, reasons = grpc_stream(smollm2_server, None, {
        "text_input": np.array([["Describe a person as JSON:".encode()]], np.object_),
        "max_tokens": np.array([[96]], np.int32),
        "structured_outputs": np.array([[json.dumps(spec).encode()]], np.object_)})
    jsonschema.validate(json.loads("".join(pieces)), PERSON)
    assert reasons[-1] == "end_id"


def _call_valid(call, names):
    assert call.type == "function" and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), ARGUMENT_SCHEMAS[call.function.name])
    assert call.id.startswith("call_")


@pytest.mark.parametrize("seed", [0, 1])
def test_required_and_named_tool_choices_always_give_a_valid_call(client, seed):
    questions = ["What's the weather like in Oslo?", "What time is it in Tokyo?", "Tell me a joke."]
    for question in questions:
        answer = ask(client, question, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                     max_tokens=256)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        for call in choice.message.tool_calls:
            _call_valid(call, {"get_weather", "get_time"})
        answer = ask(client, question, tools=TOOLS, temperature=1.0, seed=seed, parallel_tool_calls=False,
                     tool_choice={"type": "function", "function": {"name": "get_time"}})
        calls = answer.choices[0].message.tool_calls
        assert len(calls) == 1
        _call_valid(calls[0], {"get_time"})


def test_auto_answers_in_words_or_calls_and_tool_results_go_back_into_the_chat(client):
    answer = ask(client, "What's the weather like in Paris today?", tools=[WEATHER])
    choice = answer.choices[0]
    assert (choice.message.tool_calls and choice.finish_reason == "tool_calls") or \
        (isinstance(choice.message.content, str) and choice.finish_reason == "stop")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [{"role": "user", "content": "What's the weather like in Paris today?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'}]
    answer = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], max_tokens=60,
                                            tool_choice="auto")
    assert answer.choices[0].finish_reason in ("stop", "tool_calls", "length")


def test_streamed_tool_calls_assemble_to_the_non_streamed_ones(client):
    for question, choice in [("What's the weather in Rome and the time in Lima?", "required"),
                             ("Weather in Kyiv?", {"type": "function", "function": {"name": "get_weather"}}),
                             ("Say hello to me.", "auto")]:
        whole = ask(client, question, tools=TOOLS, tool_choice=choice, temperature=0.0, max_tokens=256).choices[0]
        calls: dict[int, dict] = {}
        content, finish = "", None
        for chunk in ask(client, question, tools=TOOLS, tool_choice=choice, temperature=0.0, stream=True,
                         max_tokens=256):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for part in delta.tool_calls or []:
                entry = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
                if part.id:
                    entry["id"], entry["name"] = part.id, part.function.name
                entry["arguments"] += part.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == whole.finish_reason
        if whole.message.tool_calls:
            assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
                [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
            assert all(c["id"].startswith("call_") for c in calls.values())
        else:
            assert content == whole.message.content and not calls


def test_a_grammar_request_beside_plain_ones_leaves_their_greedy_text_unchanged(client):
    # the test server runs 2 sequences and queues 1 more (conftest.SMOLLM2_MAX_WAITING): one under a grammar, two
    # plain, in the same batch or waiting for it
    plain = ["Write a sentence about the sea.", "Name three fruits."]
    alone = [ask(client, p, max_tokens=24, temperature=0.0).choices[0].message.content for p in plain]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        constrained = [pool.submit(ask, client, PROMPTS[0], response_format=response_format, temperature=1.0, seed=4)]
        beside = [pool.submit(lambda p: ask(client, p, max_tokens=24, temperature=0.0).choices[0].message.content, p)
                  for p in plain]
        assert [f.result() for f in beside] == alone
        for future in constrained:
            jsonschema.validate(json.loads(future.result().choices[0].message.content), PERSON)


def test_min_p_logit_bias_and_stop_token_ids(client):
    prompt = "Count: one, two,"

    def complete(**kwargs):
        return client.completions.create(model="smollm2", prompt=prompt, max_tokens=kwargs.pop("max_tokens", 6),
                                         **kwargs).choices[0]

    greedy = complete(temperature=0.0, logprobs=0)
    # min_p 1: only the most likely token is left, whatever the seed
    assert complete(temperature=1.0, seed=5, extra_body={"min_p": 1.0}).text == greedy.text
    forced = complete(temperature=0.0, logit_bias={"42": 100}, logprobs=0, max_tokens=3)
    assert len(set(forced.logprobs.tokens)) == 1 and forced.logprobs.tokens != greedy.logprobs.tokens[:3]
    banned = complete(temperature=0.0, logit_bias={"42": 100}, extra_body={"stop_token_ids": [42]})
    # as vLLM: the stop token ends the output and its text is not in it
    assert banned.finish_reason == "stop" and banned.text == ""


def test_bad_grammars_and_tool_choices_are_400s_naming_the_field_and_the_server_goes_on(client):
    import openai

    cases = [(dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
              "response_format"),
             (dict(extra_body={"structured_outputs": {"regex": "[a-"}}), "structured_outputs"),
             (dict(extra_body={"guided_choice": []}), "guided_choice"),
             (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
              "tool_choice.function.name"),
             (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
             (dict(response_format={"type": "json_object"}, tools=TOOLS), "tools"),
             (dict(logit_bias={"999999": 5}), "logit_bias"),
             (dict(extra_body={"min_p": 2}), "min_p")]
    for kwargs, field in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            ask(client, "Hello", **kwargs)
        assert raised.value.body["param"] == field, (kwargs, raised.value.body)
        assert f"'{field}'" in raised.value.body["message"]
    assert ask(client, "Hello", max_tokens=4).choices[0].message.content


# ---- the Responses API ---------------------------------------------------------------------------------------

def test_responses_text_equals_the_chat_answer_whole_and_streamed(client):
    chat = ask(client, "Name a colour.", max_tokens=12, temperature=0.0).choices[0].message.content
    response = client.responses.create(model="smollm2", input="Name a colour.", max_output_tokens=12, temperature=0.0)
    assert response.output_text == chat and response.status in ("completed", "incomplete")
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 0
    events = list(client.responses.create(model="smollm2", input="Name a colour.", max_output_tokens=12,
                                          temperature=0.0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                       "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == chat
    assert events[-1].response.output_text == chat
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_instructions_schema_and_function_tools(client):
    response = client.responses.create(
        model="smollm2", instructions="Answer in JSON.", input=[{"role": "user", "content": PROMPTS[0]}],
        max_output_tokens=96, text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(response.output_text), PERSON)
    flat = [{"type": "function", **WEATHER["function"]}]
    response = client.responses.create(model="smollm2", input="What's the weather in Oslo?", tools=flat,
                                       tool_choice="required", max_output_tokens=200)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), ARGUMENT_SCHEMAS["get_weather"])
    streamed = list(client.responses.create(model="smollm2", input="What's the weather in Oslo?", tools=flat,
                                            tool_choice="required", max_output_tokens=200, temperature=0.0,
                                            stream=True))
    done = [e.item for e in streamed if e.type == "response.output_item.done"]
    whole = client.responses.create(model="smollm2", input="What's the weather in Oslo?", tools=flat,
                                    tool_choice="required", max_output_tokens=200, temperature=0.0)
    assert [(i.name, json.loads(i.arguments)) for i in done] == \
        [(i.name, json.loads(i.arguments)) for i in whole.output]
    assert "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta") == \
        done[0].arguments
    # the call and its output go back in, and the model answers
    follow = client.responses.create(model="smollm2", tools=flat, max_output_tokens=40, input=[
        {"role": "user", "content": "What's the weather in Oslo?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 3}'}])
    assert follow.output


def test_responses_refusals_name_the_responses_fields(client):
    import openai

    for kwargs, field in [(dict(previous_response_id="resp_1"), "previous_response_id"),
                          (dict(store=True), "store"),
                          (dict(max_output_tokens=0), "max_output_tokens"),
                          (dict(tools=[{"type": "function", "name": "a b"}]), "tools[0].name"),
                          (dict(tools=[{"type": "web_search"}]), "tools[0]"),
                          (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "foo"}}}),
                           "text.format"),
                          (dict(input=[{"role": "wizard", "content": "hi"}]), "input[0].role")]:
        with pytest.raises(openai.BadRequestError) as raised:
            client.responses.create(model="smollm2", **{"input": "hi", **kwargs})
        assert raised.value.body["param"] == field, (kwargs, raised.value.body)
