"""The one table of request parameters (mstriton/params.py PARAMETERS) and what is made from it: GenerationParams,
the names parse_request reads, the Triton configs' client inputs, the frontend doors' fields, docs/inputs.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

# mindspore before anything loads protobuf (mstriton.repository loads tritonclient's configs): its generated code
# needs the pure-Python protobuf it selects on import, and other test modules import it
import mindspore  # noqa: F401,I001
import numpy as np
import pytest

from mstriton.frontend.errors import ApiError
from mstriton.frontend.fields import Fields, door_settings
from mstriton.params import (DOORS, PARAMETERS, SETTINGS, GenerationParams, ParameterError, door_fields,
                             inputs_table, with_inputs_table)
from mstriton.repository import CLIENT_INPUTS, UNARY_INPUTS
from mstriton.serving.requests import parse_request

INPUTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "inputs.md"
NUMPY = {"TYPE_INT32": np.int32, "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32, "TYPE_BOOL": np.bool_}


def test_the_inputs_table_in_the_docs_is_the_one_the_parameters_make():
    text = INPUTS_PAGE.read_text()
    assert text == with_inputs_table(text), ("docs/inputs.md's inputs table differs from params.PARAMETERS: "
                                             "`.venv/bin/python -m mstriton.params docs/inputs.md` writes it")


def test_every_input_name_is_unique_and_the_configs_declare_each_once():
    names = [name for p in PARAMETERS for name in p.input_names]
    assert len(names) == len(set(names))
    assert [name for name, _, _ in CLIENT_INPUTS] == names
    assert [name for name, _, _ in UNARY_INPUTS] == [n for n in names if n != "stop"]


def test_generation_params_fields_and_defaults_are_the_settings():
    fields = dataclasses.fields(GenerationParams)
    assert [f.name for f in fields] == [p.name for p in SETTINGS]
    defaults = GenerationParams()
    for p in SETTINGS:
        assert getattr(defaults, p.name) == ([] if p.many else p.default), p.name


VALID_TEXTS = {"logit_bias": '{"7": -3.5}', "structured_outputs": '{"regex": "[ab]+"}',
               "tools": '[{"type": "function", "function": {"name": "f"}}]'}


def _valid(p):
    """A value of `p` other than its default that every range admits."""
    if p.kind is bool:
        return not p.default
    if p.kind is list:
        return ["word"] if p.item_kind is str else [3, 9]
    if p.kind is str:
        return VALID_TEXTS[p.name]
    if p.kind is int:
        return 2 if p.name != "max_tokens" else 5
    return 0.5


@pytest.mark.parametrize("p", SETTINGS, ids=lambda p: p.name)
def test_parse_request_reads_every_setting_under_each_of_its_names_as_a_tensor_or_a_parameter(p):
    value = _valid(p)
    for name in p.input_names:
        sent = (not value) if name in p.negated else value
        if p.kind is list and p.item_kind is str:
            tensor = np.array([[w.encode() for w in sent]], np.object_)
        elif p.kind is list:
            tensor = np.array([sent], np.int32)
        elif p.kind is str:
            tensor = np.array([[sent.encode()]], np.object_)
        else:
            tensor = np.array([[sent]], NUMPY[p.triton_type])
        by_tensor = parse_request({"text_input": np.array([[b"hi"]], np.object_), name: tensor}.get)
        by_parameter = parse_request({}.get, {"text_input": "hi", name: sent})
        for parsed in (by_tensor, by_parameter):
            assert getattr(parsed.params, p.name) == pytest.approx(value), name
            parsed.params.validate(max_new_tokens_limit=100, vocab_size=100)


@pytest.mark.parametrize("p", [p for p in SETTINGS if p.bounded], ids=lambda p: p.name)
def test_every_bounded_setting_refuses_a_value_below_its_range_naming_it(p):
    low = p.low if not isinstance(p.low, str) else 0
    with pytest.raises(ParameterError) as raised:
        GenerationParams(**{p.name: low - 1}).validate(max_new_tokens_limit=100, vocab_size=100)
    assert str(raised.value).startswith(f"'{p.name}' must be ")


def test_each_door_reads_its_fields_under_the_clients_names_with_its_bounds_and_defaults():
    assert set(door_fields("tgi").items()) >= {("max_tokens", "max_new_tokens"), ("top_logprobs", "top_n_tokens")}
    assert door_settings(Fields({"top_n_tokens": 3, "max_new_tokens": 7}, "parameters."), "tgi") == \
        {"max_tokens": 7, "top_logprobs": 3}
    with pytest.raises(ApiError) as raised:
        door_settings(Fields({"top_n_tokens": 21}, "parameters."), "tgi")
    assert raised.value.param == "parameters.top_n_tokens"
    # MindSpore Serving's seed defaults
    assert door_settings(Fields({}), "mindspore_serving") == {"top_k": 3, "top_p": 1.0, "temperature": 1.0,
                                                              "repetition_penalty": 1.0, "do_sample": False}
    with pytest.raises(ApiError, match=r"'temperature' must be a number in \[0, 2\]"):
        door_settings(Fields({"temperature": 2.5}), "openai")
    for door in DOORS:
        assert door_fields(door)
