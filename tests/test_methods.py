"""Methods (serving/methods.py), without a server: the --method flag and the file's checks, the request fields a
method gets, its preprocess and postprocess called with their errors, the repository's method folders, and the
example method of client_examples/methods/. tests/test_methods_server.py serves them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from mstriton.params import ParameterError, RequestLimits
from mstriton.serving import methods as m

EXAMPLE = REPO_ROOT / "client_examples" / "methods" / "summarize.py"


def method_file(tmp_path: Path, source: str, name: str = "method.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


ECHO = """
    def preprocess(request):
        how = request.get("fail")
        if how == "value":
            raise ValueError("no good")
        if how == "crash":
            raise KeyError("boom")
        if how == "type":
            return ["not", "a", "dict"]
        if how == "type_of_field":
            return {"text_input": "x", "max_tokens": "many"}
        if how == "both":
            return {"text_input": "x", "messages": [{"role": "user", "content": "y"}]}
        if how == "exit":
            import sys
            sys.exit(3)
        return {**request, "text_input": "<" + request["text_input"] + ">", "max_tokens": 7}

    def postprocess(text, request):
        how = request.get("fail")
        if how == "post":
            raise RuntimeError("bad postprocess")
        if how == "post_type":
            return text
        if how == "post_text":
            return {"text_output": 12}
        if how == "post_json":
            return {"text_output": text, "set": {1, 2}}
        return {"text_output": text.upper(), "length": len(text)}
"""


@pytest.fixture
def echo(tmp_path) -> m.Method:
    return m.load_method(method_file(tmp_path, ECHO), "echo")


def getter(tensors: dict):
    return lambda name: tensors.get(name)


# ---- the flag and the file -----------------------------------------------------------------------------------------

def test_flag_names_and_reserved_names():
    assert m.parse_method_flag("summarize=a/b.py") == ("summarize", Path("a/b.py"))
    assert m.parse_method_flag("v2_Short=x=y.py") == ("v2_Short", Path("x=y.py"))
    for flag, words in [("summarize", "must be NAME=FILE"), ("=x.py", "letters, digits or '_'"),
                        ("sum-up=x.py", "letters, digits or '_'"), ("s p=x.py", "letters, digits"),
                        ("decode=x.py", "cannot be named 'decode'"), ("unary=x.py", "cannot be named"),
                        ("prefill=x.py", "cannot be named"), ("a_unary=x.py", "ending in _unary"),
                        ("summarize=", "must be NAME=FILE")]:
        with pytest.raises(m.MethodFileError, match=words) as raised:
            m.parse_method_flag(flag)
        assert str(raised.value).startswith(f"--method {flag}:")


@pytest.mark.parametrize("source, words", [
    ("def preprocess(request):\n    return request\n", r"must define postprocess\(\)"),
    ("preprocess = 3\ndef postprocess(text, request):\n    return {}\n", r"must define preprocess\(\) .*found int"),
    ("def preprocess():\n    return {}\ndef postprocess(text, request):\n    return {}\n",
     r"preprocess must take the arguments of preprocess\(request\)"),
    ("def preprocess(request):\n    return {}\ndef postprocess(text):\n    return {}\n",
     r"postprocess must take the arguments of postprocess\(text, request\)"),
    ("async def preprocess(request):\n    return {}\ndef postprocess(text, request):\n    return {}\n",
     "preprocess must be a plain function, not async"),
    ("import no_such_module_here\n", "importing .* failed: ModuleNotFoundError"),
    ("def preprocess(request)\n", "importing .* failed: SyntaxError"),
    ("raise SystemExit(1)\n", "importing .* failed: SystemExit"),
])
def test_a_file_that_cannot_serve_is_refused_with_the_reason(tmp_path, source, words):
    with pytest.raises(m.MethodFileError, match=words) as raised:
        m.load_method(method_file(tmp_path, source), "summarize")
    assert str(raised.value).startswith("method summarize: ")


def test_a_file_that_is_missing_or_not_python(tmp_path):
    with pytest.raises(m.MethodFileError, match="is not a file"):
        m.load_method(tmp_path / "nowhere.py", "s")
    with pytest.raises(m.MethodFileError, match=r"must be a Python file \(.py\)"):
        m.load_method(method_file(tmp_path, "x = 1\n", "notes.txt"), "s")


def test_functions_with_defaults_and_varargs_load(tmp_path):
    source = """
        def preprocess(request, extra=None):
            return request
        def postprocess(*args, **kwargs):
            return {}
    """
    method = m.load_method(method_file(tmp_path, source), "flexible")
    assert method.name == "flexible" and callable(method.preprocess) and callable(method.postprocess)


def test_cli_refuses_a_bad_method_before_converting(tmp_path):
    def cli(*flags):
        return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert.py"), "--checkpoint", tmp_path,
                               "--name", "m", "--model-repository", tmp_path / "repo", *flags],
                              capture_output=True, text=True, timeout=60)
    broken = method_file(tmp_path, "def preprocess(request):\n    return request\n", "half.py")
    for flags, words in [(["--method", f"summarize={broken}"], f"--method summarize={broken}: method summarize: "
                                                                 f"{broken} must define postprocess()"),
                         (["--method", "sum up=x.py"], "--method sum up=x.py: a method's name must be letters"),
                         (["--method", f"s={EXAMPLE}", "--method", f"s={EXAMPLE}"], "the method s is given twice")]:
        result = cli(*flags)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert "reading checkpoint" not in result.stdout
    assert not (tmp_path / "repo").exists()


# ---- the request a method gets -------------------------------------------------------------------------------------

def test_request_fields_from_inputs_parameters_and_method_fields():
    tensors = {"text_input": np.array([["a text".encode()]], np.object_),
               "max_tokens": np.array([[9]], np.int32), "temperature": np.array([[0.5]], np.float32),
               "stream": np.array([[False]]), "stop_words": np.array([[b"x", b"y"]], np.object_),
               "method_fields": np.array([[json.dumps({"max_words": 5, "style": {"tone": "dry"},
                                                       "max_tokens": 1}).encode()]], np.object_)}
    fields = m.request_fields(getter(tensors), list(tensors), {"max_words": 99, "user": "u1"})
    assert fields == {"text_input": "a text", "max_tokens": 9, "temperature": 0.5, "stream": False,
                      "stop_words": ["x", "y"], "max_words": 5, "style": {"tone": "dry"}, "user": "u1"}
    assert type(fields["max_tokens"]) is int and type(fields["stream"]) is bool

    chat = json.dumps([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    fields = m.request_fields(getter({"messages": np.array([[chat.encode()]], np.object_)}), ["messages"],
                              {"method_fields": '{"n": 1}'})
    assert fields == {"messages": [{"role": "user", "content": "hi"}], "n": 1}
    assert m.request_fields(getter({}), ["text_input"], {"messages": chat})["messages"][0]["content"] == "hi"


def test_request_fields_refusals_name_the_field():
    limits = RequestLimits(max_prompt_bytes=16)
    with pytest.raises(ParameterError, match="'text_input' must be at most 16 bytes"):
        m.request_fields(getter({"text_input": np.array([[b"x" * 17]], np.object_)}), ["text_input"], limits=limits)
    with pytest.raises(ParameterError, match="'note' must be at most 16 bytes"):
        m.request_fields(getter({}), [], {"note": "y" * 17}, limits=limits)
    with pytest.raises(ParameterError, match="'method_fields' must be a JSON object of the method's fields"):
        m.request_fields(getter({"method_fields": np.array([[b"[1, 2]"]], np.object_)}), ["method_fields"])
    with pytest.raises(ParameterError, match="'method_fields' must be a JSON object"):
        m.request_fields(getter({"method_fields": np.array([[b"{oops"]], np.object_)}), ["method_fields"])
    with pytest.raises(ParameterError, match="'text_input' is not valid UTF-8"):
        m.request_fields(getter({"text_input": np.array([[b"\xff"]], np.object_)}), ["text_input"])
    with pytest.raises(ParameterError, match="messages"):
        m.request_fields(getter({"messages": np.array([[b'[{"role": "wizard", "content": "x"}]']], np.object_)}),
                         ["messages"])


def test_stop_is_not_a_methods_business():
    assert m.wants_stop({"stop": True}) and m.wants_stop({"stop": np.bool_(True)})
    assert not m.wants_stop({"stop": False}) and not m.wants_stop({"text_input": "x"})


# ---- preprocess and postprocess --------------------------------------------------------------------------------

def test_preprocess_makes_the_request_and_the_transport_stays_the_clients(echo):
    fields = {"text_input": "hi", "stream": False, "stop": False, "temperature": 0.0, "max_words": 3}
    parsed = m.preprocessed(echo, fields)
    assert parsed.text == "<hi>" and parsed.params.max_tokens == 7 and parsed.params.temperature == 0.0
    assert parsed.params.stream is False and not parsed.stop
    assert fields["text_input"] == "hi"  # preprocess got a copy
    assert m.preprocessed(echo, {"text_input": "hi"}).params.stream is True  # the default: streamed


@pytest.mark.parametrize("how, kind, words", [
    ("value", m.MethodRefused, "method echo: preprocess raised ValueError: no good"),
    ("crash", m.MethodFailed, "method echo: preprocess raised KeyError: 'boom'"),
    ("type", m.MethodFailed, "method echo: preprocess returned list, not a dict"),
    ("type_of_field", m.MethodRefused,
     "method echo: preprocess returned a request that is refused: 'max_tokens' must be a int, got text 'many'"),
    ("both", m.MethodRefused, "method echo: preprocess returned a request that is refused: send either 'text_input' "
                              "or 'messages', not both"),
    ("exit", m.MethodFailed, r"method echo: preprocess raised SystemExit\(3\)"),
])
def test_a_failing_preprocess_is_the_requests_error(echo, how, kind, words):
    with pytest.raises(kind, match=words):
        m.preprocessed(echo, {"text_input": "hi", "fail": how})


def test_refused_and_failed_are_told_apart_as_the_models_answer_them(echo):
    """The front model answers a ValueError as an invalid request (INVALID_ARG, HTTP 400), others as internal."""
    assert isinstance(m.MethodRefused("x"), ValueError) and isinstance(m.MethodRefused("x"), ParameterError)
    assert not isinstance(m.MethodFailed("x"), ValueError)


def test_postprocess_replaces_the_text_and_gives_its_dict(echo):
    text, output = m.postprocessed(echo, "abc é", {"text_input": "hi"})
    assert text == "ABC É" and json.loads(output) == {"text_output": "ABC É", "length": 5}
    assert "É" in output  # JSON text as it is, not escaped


@pytest.mark.parametrize("how, words", [
    ("post", "method echo: postprocess raised RuntimeError: bad postprocess"),
    ("post_type", "method echo: postprocess returned str, not a dict"),
    ("post_text", "method echo: postprocess returned a text_output of type int, not str"),
    ("post_json", "method echo: postprocess returned a dict that is not JSON"),
])
def test_a_failing_postprocess_is_the_requests_error(echo, how, words):
    with pytest.raises(m.MethodFailed, match=words):
        m.postprocessed(echo, "abc", {"fail": how})


def test_calls_run_in_the_methods_thread_and_a_method_that_did_not_load_answers_every_request(tmp_path):
    source = """
        import threading
        def preprocess(request):
            return {"text_input": threading.current_thread().name}
        def postprocess(text, request):
            return {"thread": threading.current_thread().name}
    """
    calls = m.MethodCalls.load(method_file(tmp_path, source), "threads")

    async def both():
        return await calls.preprocess({}), await calls.postprocess("x", {})
    parsed, (text, output) = asyncio.run(both())
    assert parsed.text.startswith("mstriton-method") and json.loads(output)["thread"].startswith("mstriton-method")
    assert text is None
    calls.close()

    broken = m.MethodCalls.load(method_file(tmp_path, "import no_such_module_here\n", "b.py"), "broken")
    for call in (broken.preprocess({"text_input": "x"}), broken.postprocess("x", {})):
        with pytest.raises(m.MethodFailed, match="method broken: importing .* failed: ModuleNotFoundError"):
            asyncio.run(call)


# ---- the example ---------------------------------------------------------------------------------------------

def test_the_example_summarizes_in_at_most_max_words():
    method = m.load_method(EXAMPLE, "summarize")
    parsed = m.preprocessed(method, {"text_input": "  Triton serves\nmodels.  ", "max_words": 5, "temperature": 0.0})
    assert parsed.text == "" and parsed.messages == [
        {"role": "system", "content": "You are a helpful assistant that writes short summaries."},
        {"role": "user", "content": "Summarize this text in one sentence of at most 5 words:\n\nTriton serves models."}]
    assert parsed.params.max_tokens == 18 and parsed.params.temperature == 0.0
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Chat text."}]}
    assert m.preprocessed(method, chat).messages[1]["content"] == \
        "Summarize this text in one sentence of at most 30 words:\n\nChat text."
    assert "at most 7 words" in m.preprocessed(method, {"text_input": "t", "max_words": "7"}).messages[1]["content"]
    assert m.preprocessed(method, {"text_input": "t", "max_tokens": 3}).params.max_tokens == 3

    text, output = m.postprocessed(method, " one  two\nthree four ", {"max_words": 3})
    assert text == "one two three"
    assert json.loads(output) == {"text_output": "one two three", "summary_words": 3, "truncated": True}
    with pytest.raises(m.MethodRefused, match=r"method summarize: preprocess raised ValueError: max_words must be an "
                                              r"integer in \[1, 200\], got 0"):
        m.preprocessed(method, {"text_input": "t", "max_words": 0})
    with pytest.raises(m.MethodRefused, match="send the text to summarize"):
        m.preprocessed(method, {"max_words": 3})


# ---- the repository's folders ------------------------------------------------------------------------------

def test_method_configs_and_owned_folders(tmp_path):
    from mstriton.repository import method_configs, method_of, model_configs, owned_model_dirs, write_config

    engine_params = {"tokenizer": "tokenizer.model", "max_seq_len": "64", "vocab_size": "100", "end_ids": "2",
                     "template": "none", "tool_format": "generic"}
    configs = model_configs("m", max_batch_size=2, device="CPU", device_id=0, engine_params=engine_params)
    models = method_configs("m", "summarize", configs)
    assert list(models) == ["m_summarize", "m_summarize_unary"]
    (front_kind, front), (unary_kind, unary) = models.values()
    assert (front_kind, unary_kind) == ("", "unary")
    assert front.model_transaction_policy.decoupled and not unary.model_transaction_policy.decoupled
    assert front.parameters["method"].string_value == "summarize"
    assert front.parameters["llm_name"].string_value == "m"
    assert unary.parameters["front_model"].string_value == "m_summarize"
    for config, plain in ((front, configs[""]), (unary, configs["unary"])):
        assert [t.name for t in config.input] == [t.name for t in plain.input] + ["method_fields"]
        assert [t.name for t in config.output] == [t.name for t in plain.output] + ["method_output"]
        assert config.input[-1].optional
    assert "method" not in configs[""].parameters  # the plain models are untouched

    written = {**{k: c for k, (_, c) in models.items()}, "m": configs[""], "m_decode": configs["decode"]}
    for name, config in written.items():
        write_config(tmp_path / name, config)
    other = method_configs("m_x", "y", model_configs("m_x", max_batch_size=1, device="CPU", device_id=0,
                                                     engine_params=engine_params))
    for name, (_, config) in other.items():  # the LLM m_x's method y: m_x_y, which is not m's
        write_config(tmp_path / name, config)
    (tmp_path / "m_notes").mkdir()  # not a model folder
    assert [p.name for p in owned_model_dirs(tmp_path, "m")] == ["m", "m_decode", "m_summarize",
                                                                 "m_summarize_unary"]
    assert method_of(tmp_path / "m_summarize") == ("m", "summarize")
    assert method_of(tmp_path / "m_summarize_unary") == ("m", "summarize")
    assert method_of(tmp_path / "m") is None and method_of(tmp_path / "m_notes") is None


def test_conversion_checks_methods_and_their_folders(tmp_path):
    from mstriton.repository import checked_methods, method_configs, model_configs, write_config

    assert checked_methods({"summarize": EXAMPLE}, "m", tmp_path) == {"summarize": EXAMPLE.read_bytes()}
    bad = method_file(tmp_path, "x = 1\n", "bad.py")
    with pytest.raises(m.MethodFileError, match=f"--method s={bad}: method s: {bad} must define preprocess"):
        checked_methods({"s": bad}, "m", tmp_path)
    (tmp_path / "m_summarize").mkdir()  # someone else's model
    with pytest.raises(ValueError, match="already has a model m_summarize that is not one of m's"):
        checked_methods({"summarize": EXAMPLE}, "m", tmp_path)

    engine_params = {"tokenizer": "tokenizer.model", "max_seq_len": "64", "vocab_size": "100", "end_ids": "2",
                     "template": "none", "tool_format": "generic"}
    configs = model_configs("a", max_batch_size=1, device="CPU", device_id=0, engine_params=engine_params)
    for name, (_, config) in method_configs("a", "b", configs).items():
        write_config(tmp_path / name, config)
    with pytest.raises(ValueError, match="a_b in .* is the method b of the LLM a"):
        checked_methods({}, "a_b", tmp_path)
