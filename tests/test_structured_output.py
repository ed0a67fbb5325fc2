"""Constrained decoding without a server: structured_outputs objects to grammars (and their refusals, naming the
field), the vocabulary llguidance masks (SmolLM2's tokenizer.json from its GGUF, and a sentencepiece model), the
compiler's cache, and sampling under a grammar: every output a random model produces under it parses."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest

from conftest import train_byte_fallback_tokenizer

from mstriton.engine.sampling import SamplingState, choose_tokens
from mstriton.engine.structured_output import GrammarCompiler, check, grammar_of, grammar_tokenizer
from mstriton.model.gguf_tokenizer import tokenizer_files
from mstriton.params import GenerationParams, ParameterError
from mstriton.pretrained import smollm2_gguf
from mstriton.tokenizer import load_tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    for name, text in tokenizer_files(gguf.GGUFReader(smollm2_gguf())).items():
        (folder / name).write_text(text)
    tokenizer = load_tokenizer(folder)
    return folder / "tokenizer.json", tokenizer


@pytest.fixture(scope="module")
def compiler(smollm2):
    path, tokenizer = smollm2
    compiler = GrammarCompiler(lambda: grammar_tokenizer(path, tokenizer.vocab_size, [tokenizer.eos_id]))
    yield compiler
    compiler.close()


@pytest.mark.parametrize("spec, message", [
    ({}, "'structured_outputs' must hold exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of json, json_object, regex, choice, grammar, got regex, choice"),
    ({"yaml": "x"}, "'structured_outputs.yaml' is not a kind of structured output"),
    ({"choice": []}, "'structured_outputs.choice' must be a non-empty list"),
    ({"json": "{not json"}, "'structured_outputs.json' must be a JSON schema"),
    ({"json_object": 1}, "'structured_outputs.json_object' must be true"),
    ({"regex": ""}, "'structured_outputs.regex' must be a non-empty regular expression"),
])
def test_malformed_objects_are_refused_naming_the_field(spec, message):
    with pytest.raises(ParameterError, match=re.escape(message)):
        grammar_of(spec)


@pytest.mark.parametrize("spec, message", [
    ({"regex": "[a-"}, "unclosed character class"),
    ({"json": {"type": "foo"}}, "foo"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
])
def test_grammars_that_do_not_compile_are_refused_with_the_compilers_reason(spec, message):
    with pytest.raises(ParameterError, match=r"'structured_outputs' cannot be compiled: .*" + re.escape(message)):
        check(json.dumps(spec))


def test_validate_checks_structured_outputs_and_the_other_new_settings():
    GenerationParams(structured_outputs='{"choice": ["yes", "no"]}', logit_bias='{"5": 100}', min_p=0.1,
                     stop_token_ids=[3]).validate(max_new_tokens_limit=50, vocab_size=100)
    for settings, message in [({"structured_outputs": '{"regex": "("}'}, "'structured_outputs' cannot be compiled"),
                              ({"logit_bias": '{"100": 1}'}, r"'logit_bias' keys must be token ids in \[0, 100\)"),
                              ({"logit_bias": '{"5": 101}'}, r"'logit_bias\[5\]' must be a number in \[-100, 100\]"),
                              ({"logit_bias": '[1]'}, "'logit_bias' must be a JSON object"),
                              ({"stop_token_ids": [100]}, r"'stop_token_ids\[0\]' must be a token id in \[0, 100\)"),
                              ({"min_p": 1.5}, r"'min_p' must be in \[0, 1\]")]:
        with pytest.raises(ParameterError, match=message):
            GenerationParams(**settings).validate(max_new_tokens_limit=50, vocab_size=100)


def _generate(compiler, tokenizer, spec: dict, seed: int, steps: int = 80, greedy=False) -> tuple[str, str]:
    """Random logits (a model that knows nothing) sampled under the grammar until it ends: (text, finish)."""
    params = GenerationParams(seed=seed, temperature=0.0 if greedy else 1.0, structured_outputs=json.dumps(spec))
    state = SamplingState(params=params, end_ids=(tokenizer.eos_id,), prompt_ids=[1],
                          matcher=compiler.submit(grammar_of(spec)).result())
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        logits = rng.normal(0, 3, (1, tokenizer.vocab_size)).astype(np.float32)
        token = int(choose_tokens(logits, [state])[0][0])
        state.record(token)
        if token == tokenizer.eos_id:
            return tokenizer.decode(state.generated[:-1]), "end"
    return tokenizer.decode(state.generated), "length"


@pytest.mark.parametrize("seed", range(6))
def test_random_models_under_a_schema_write_json_that_validates(compiler, smollm2, seed):
    _, tokenizer = smollm2
    text, finish = _generate(compiler, tokenizer, {"json": PERSON}, seed, steps=200)
    assert finish == "end", text
    value = json.loads(text)
    assert set(value) <= {"name", "age", "tags"} and {"name", "age"} <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
    assert all(t in ("a", "b") for t in value.get("tags", [])) and len(value.get("tags", [])) <= 3


@pytest.mark.parametrize("seed", range(4))
def test_regex_choice_and_grammar_outputs_match(compiler, smollm2, seed):
    _, tokenizer = smollm2
    text, _ = _generate(compiler, tokenizer, {"regex": r"[0-9]{3}-[a-z]{2,4}"}, seed)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    text, _ = _generate(compiler, tokenizer, {"choice": ["red", "green", "blue sky"]}, seed)
    assert text in ("red", "green", "blue sky")
    gbnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9]+'
    text, _ = _generate(compiler, tokenizer, {"grammar": gbnf}, seed, steps=60)
    assert re.fullmatch(r"\(\d+(,\d+)*\)?", text) or re.fullmatch(r"\(\d+(,\d+)*", text), text
    text, finish = _generate(compiler, tokenizer, {"json_object": True}, seed, steps=300)
    if finish == "end":
        assert isinstance(json.loads(text), dict)


def test_compiled_grammars_are_kept_by_their_text_and_each_request_gets_its_own_state(compiler, smollm2):
    _, tokenizer = smollm2
    grammar = grammar_of({"choice": ["alpha", "beta"]})
    hits = compiler.cache_hits
    first, second = compiler.submit(grammar).result(), compiler.submit(grammar).result()
    assert compiler.cache_hits >= hits + 1
    first.consume_tokens(tokenizer.encode("alpha", add_special_tokens=False))
    assert first.is_accepting() and not second.is_accepting()


def test_a_sentencepiece_vocabulary_is_masked_too(tmp_path):
    model = train_byte_fallback_tokenizer(tmp_path / "tokenizer.model")  # trained on text of our own
    tokenizer = load_tokenizer(model)
    compiler = GrammarCompiler(lambda: grammar_tokenizer(model, tokenizer.vocab_size + 3, [tokenizer.eos_id]))
    try:
        for seed in range(3):
            text, finish = _generate(compiler, tokenizer, {"regex": "(yes|no)( maybe)?"}, seed)
            assert finish == "end" and re.fullmatch("(yes|no)( maybe)?", text), text
    finally:
        compiler.close()


def test_min_p_logit_bias_and_a_grammar_with_no_way_out_end_cleanly():
    logits = np.zeros((1, 10), np.float32)
    logits[0, 4] = 5.0
    # min_p: only tokens within a factor of the best survive
    state = SamplingState(params=GenerationParams(seed=1, temperature=1.0, min_p=0.5), end_ids=(2,), prompt_ids=[])
    assert {int(choose_tokens(logits, [state])[0][0]) for _ in range(50)} == {4}
    # logit_bias moves greedy choices too, and -100 bans
    state = SamplingState(params=GenerationParams(temperature=0.0, logit_bias='{"7": 10, "4": -100}'), end_ids=(2,),
                          prompt_ids=[])
    assert int(choose_tokens(logits, [state])[0][0]) == 7
    assert state.processed


@pytest.mark.parametrize("tool_format, parallel", [("hermes", True), ("hermes", False), ("llama3_json", False)])
@pytest.mark.parametrize("seed", range(3))
def test_a_random_model_held_to_a_templates_tool_syntax_writes_calls_that_validate(compiler, smollm2, tool_format,
                                                                                  parallel, seed):
    import jsonschema

    from mstriton.frontend.fields import Fields
    from mstriton.frontend.native_tools import in_format
    from mstriton.frontend.tools import ToolRequest

    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
            "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                  "additionalProperties": False}}}]
    request = in_format(ToolRequest.from_body(Fields({"tools": tools, "tool_choice": "required",
                                                      "parallel_tool_calls": parallel})), tool_format)
    _, tokenizer = smollm2
    text, finish = _generate(compiler, tokenizer, request.structured_outputs(), seed, steps=400)
    assert finish == "end", text
    content, calls = request.parse(text)
    assert content is None and calls and (parallel or len(calls) == 1), text
    for call in calls:
        schema = {"get_weather": city, "get_time": tools[1]["function"]["parameters"]}[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
