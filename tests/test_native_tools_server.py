"""Tool calls in a template's own syntax, against the real tritonserver and frontend, driven by the `openai` SDK: a
tiny random model converted twice, with a template in the <tool_call> syntax (hermes) and one in Llama 3's JSON
syntax (both in tests/data/templates). The template is given the tools (the prompt grows by their description);
required and named choices come back as valid calls in OpenAI's form, whole and streamed alike; earlier calls and
tool results go back through the template; auto leaves the model free."""

from __future__ import annotations

import json

import jsonschema
import pytest

from conftest import save_streaming_checkpoint

TEMPLATES = {"hermes": "hermes_tools.jinja", "llama3": "llama3_tools.jinja"}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}
ZONE = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": ZONE}}]
SCHEMAS = {"get_weather": CITY, "get_time": ZONE}
QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import openai

    from pathlib import Path

    from mstriton.convert import convert
    from mstriton.server_process import running_frontend, running_server

    root = tmp_path_factory.mktemp("native_tools")
    checkpoint = save_streaming_checkpoint(root, max_position_embeddings=2048)
    templates = Path(__file__).parent / "data" / "templates"
    for name, template in TEMPLATES.items():
        convert(checkpoint, name, root / "repo", max_batch_size=4, max_seq_len=2048,
                template=str(templates / template), progress=lambda _: None)
    with running_server(root / "repo", root / "server.log") as triton, \
            running_frontend(triton, root / "frontend.log") as frontend:
        yield openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)


def ask(client, model, messages=QUESTION, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=kwargs.pop("max_tokens", 300),
                                          **kwargs)


def valid_calls(message) -> list[tuple[str, dict]]:
    calls = []
    for call in message.tool_calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"
        calls.append((call.function.name, arguments))
    return calls


@pytest.mark.parametrize("model", list(TEMPLATES))
def test_the_template_is_given_the_tools(client, model):
    plain = ask(client, model, max_tokens=1)
    with_tools = ask(client, model, max_tokens=1, tools=TOOLS)
    # the tools' description (about 400 characters) is in the prompt the template rendered
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50


@pytest.mark.parametrize("model", list(TEMPLATES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_and_named_choices_give_valid_calls_in_openais_form(client, model, seed):
    answer = ask(client, model, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                 parallel_tool_calls=False)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert len(valid_calls(choice.message)) == 1
    named = ask(client, model, tools=TOOLS, temperature=1.0, seed=seed,
                tool_choice={"type": "function", "function": {"name": "get_time"}})
    [(name, _)] = valid_calls(named.choices[0].message)
    assert name == "get_time"


def test_parallel_calls_in_the_hermes_syntax(client):
    answer = ask(client, "hermes", tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, max_tokens=900)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert 1 <= len(valid_calls(choice.message)) <= 8


@pytest.mark.parametrize("model", list(TEMPLATES))
def test_streamed_calls_assemble_to_the_whole_answers(client, model):
    kwargs = dict(tools=TOOLS, tool_choice="required", temperature=1.0, seed=3, parallel_tool_calls=False)
    whole = ask(client, model, **kwargs).choices[0].message.tool_calls
    calls, finish = {}, None
    for chunk in ask(client, model, stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": None, "arguments": ""})
                if delta.function.name:
                    entry["name"] = delta.function.name
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]


@pytest.mark.parametrize("model", list(TEMPLATES))
def test_earlier_calls_and_tool_results_go_back_through_the_template(client, model):
    first = ask(client, model, tools=TOOLS, tool_choice="required", seed=1, temperature=1.0,
                parallel_tool_calls=False).choices[0].message
    call = first.tool_calls[0]
    turns = QUESTION + [first.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "4 degrees and rain"}]
    answer = ask(client, model, messages=turns, tools=TOOLS, max_tokens=8)
    # the conversation's turns are in the prompt: longer than the first request's
    assert answer.usage.prompt_tokens > ask(client, model, tools=TOOLS, max_tokens=1).usage.prompt_tokens + 10
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("model", list(TEMPLATES))
def test_auto_leaves_the_model_free(client, model):
    answer = ask(client, model, tools=TOOLS, max_tokens=12, temperature=0.0)
    choice = answer.choices[0]
    # a random model writes words, not calls: they come back as content, nothing held
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert choice.message.content
