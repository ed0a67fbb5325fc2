"""What the doors read as a constraint on the output, made into the one `structured_outputs` object the server
takes (vLLM's keys: json, json_object, regex, choice, grammar): OpenAI's `response_format`, vLLM's
`structured_outputs` and older `guided_*` fields, TGI's `grammar`. It is compiled here once (cached by its text)
so that a grammar that cannot be compiled is a 400 naming the field the client sent, before anything runs."""

from __future__ import annotations

from ..engine import structured_output
from ..params import ParameterError
from .errors import invalid
from .fields import Fields

# vLLM's older fields, each one kind of structured_outputs
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# vLLM's fields that only tune its own backends: accepted, and left to llguidance here
GUIDED_TUNING = ("guided_decoding_backend", "guided_whitespace_pattern")
OPENAI_FIELDS = {"response_format", "structured_outputs", *GUIDED, *GUIDED_TUNING}


def checked(spec: dict, field: str, value_field: str | None = None) -> dict:
    """`spec` if its grammar compiles; a 400 naming `field` (or `value_field`, the client's field for the
    grammar's value) otherwise."""
    try:
        structured_output.checked_grammar(spec, field, value_field)
    except ParameterError as exc:
        raise invalid(field, str(exc)) from None
    return spec


def _constraints(body: Fields) -> list[tuple[str, dict]]:
    """(the field, its structured_outputs object) for each field of an OpenAI or vLLM body that constrains the
    output, in the order they are named in errors."""
    found = []
    response_format = body.obj("response_format")
    if response_format.values:
        kind = response_format.text("type", choices=("text", "json_object", "json_schema"))
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            described = response_format.obj("json_schema")
            schema = described.values.get("schema")
            if not isinstance(schema, dict):
                raise invalid("response_format.json_schema.schema",
                              "'response_format.json_schema.schema' must be a JSON schema (an object)")
            found.append(("response_format", {"json": schema}))
    if body.has("structured_outputs"):
        found.append(("structured_outputs", body.obj("structured_outputs").values))
    for field, kind in GUIDED.items():
        if body.has(field):
            found.append((field, {kind: body.values[field]}))
    return found


def from_openai(body: Fields) -> tuple[dict | None, str | None]:
    """(the structured_outputs object of an OpenAI or vLLM body, the field it came from), or (None, None)."""
    found = _constraints(body)
    if len(found) > 1:
        raise invalid(found[1][0], f"'{found[1][0]}' and '{found[0][0]}' both constrain the output: send one")
    if not found:
        return None, None
    field, spec = found[0]
    return checked(spec, field, field if field in GUIDED else None), field


def source_field(body: Fields) -> str | None:
    """The field of an OpenAI body that from_openai reads its constraint from (for errors that name it)."""
    found = _constraints(body)
    return found[0][0] if found else None


def from_tgi(parameters: Fields) -> dict | None:
    """TGI's `parameters.grammar`: {"type": "json" | "json_object" | "regex", "value": ...}."""
    grammar = parameters.obj("grammar")
    if not grammar.values:
        return None
    grammar.refuse_unknown({"type", "value"})
    kind = grammar.text("type", choices=("json", "json_object", "regex"))
    field = grammar.name("value")
    value = grammar.values.get("value")
    if kind == "regex":
        return checked({"regex": value}, field, field)
    if kind == "json_object" and value is None:
        return checked({"json_object": True}, field, field)
    return checked({"json": value}, field, field)
