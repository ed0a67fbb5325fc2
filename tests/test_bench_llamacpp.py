"""The llama.cpp peer of the benchmark: its streaming driver against a scripted stand-in server, and (when the
llama.cpp source and server are already in build/llamacpp/, as after a benchmark run) a tiny model converted to
GGUF and served, tokenizing exactly as our tokenizer does."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from conftest import copy_test_tokenizer, save_random_hf_llama
from bench import llamacpp
from bench.timing import summarize


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers /completion with the events of `script` (a list of tokens_predicted values, the last one
    final); remembers the request bodies."""
    protocol_version = "HTTP/1.1"
    script: list[int] = []
    bodies: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"content": "", "stop": False, "tokens_predicted": 0, "tokens_evaluated": 7}]  # slot begins
        events += [{"content": "x", "stop": False, "tokens_predicted": n, "tokens_evaluated": 7}
                   for n in self.script[:-1]]
        events.append({"content": "", "stop": True, "stop_type": "limit", "tokens_predicted": self.script[-1],
                       "tokens_evaluated": 7})
        for event in events:
            data = f"data: {json.dumps(event)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def scripted():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    class Stub:
        port = httpd.server_address[1]

    _Scripted.bodies = []
    yield Stub()
    httpd.shutdown()
    httpd.server_close()


def test_driver_times_every_token_including_held_back_ones(scripted):
    # tokens 3 and 4 arrive in one event (token 3 ended inside a UTF-8 character); the final event adds none
    _Scripted.script = [1, 2, 4, 5, 6, 6]
    timings = llamacpp.run(scripted, ["a", "b", "c"], output_tokens=6, concurrency=2)
    assert len(timings) == 3
    for t in timings:
        assert len(t.token_times) == 6 and t.prompt_tokens == 7
        assert t.token_times[2] == t.token_times[3]
        assert t.start <= t.token_times[0] and t.token_times == sorted(t.token_times)
    assert sorted(b["prompt"] for b in _Scripted.bodies) == ["a", "b", "c"]
    body = _Scripted.bodies[0]
    assert body["n_predict"] == 6 and body["ignore_eos"] is True and body["cache_prompt"] is False
    assert body["stream"] is True and body["temperature"] == 0
    assert summarize(timings).output_tokens == 18


def test_driver_refuses_a_short_answer(scripted):
    _Scripted.script = [1, 2, 3, 3]
    with pytest.raises(AssertionError, match="expected 4"):
        llamacpp.run(scripted, ["a"], output_tokens=4, concurrency=1)


def test_convert_serve_and_tokenize_like_ours(tmp_path):
    tree = llamacpp.DEFAULT_CACHE_DIR / f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON_VERSION}" / "vendor" / \
        "llama.cpp"
    binary = llamacpp.DEFAULT_CACHE_DIR / "bin" / f"llama-server-{llamacpp.LLAMA_CPP_PYTHON_VERSION}"
    if not (tree / "convert_hf_to_gguf.py").is_file() or not binary.is_file():
        pytest.skip("llama.cpp is not built in build/llamacpp/ (the benchmark builds it)")
    hf = tmp_path / "hf"
    save_random_hf_llama(hf, vocab_size=60)
    copy_test_tokenizer(hf)
    gguf = llamacpp.convert_to_gguf(hf, tmp_path / "tiny-f16.gguf", "f16")
    made = gguf.stat().st_mtime_ns
    assert llamacpp.convert_to_gguf(hf, gguf, "f16").stat().st_mtime_ns == made  # reused, not converted again
    # (the test tokenizer has no byte fallback: llama.cpp's /tokenize fails on characters it lacks)
    texts = ["The quick brown fox jumps over the lazy dog", "MindSpore graphs served by Triton", "fox",
             "the cache grows while every client streams"]
    with llamacpp.LlamaCppServer(binary, gguf, parallel=2, ctx_per_slot=128, threads=1) as server:
        llamacpp.check_tokenizer(server, texts, hf / "tokenizer.model")
        timings = llamacpp.run(server, texts, output_tokens=8, concurrency=2)
    assert [len(t.token_times) for t in timings] == [8] * 4
    assert server.proc is None


# a Sapphire Rapids-like CPU: AVX-512 with VNNI/BF16/VBMI, and AMX
_XEON_FLAGS = frozenset("sse4_2 avx avx2 fma f16c bmi2 avx_vnni avx512f avx512cd avx512vl avx512dq avx512bw "
                        "avx512vbmi avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16".split())


def test_configure_names_this_cpus_instruction_sets_without_amx(tmp_path):
    args = llamacpp.configure_arguments(tmp_path / "src", tmp_path / "build", _XEON_FLAGS)
    for on in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"):
        assert f"-D{on}=ON" in args
    for off in ("GGML_NATIVE", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert f"-D{off}=OFF" in args
    assert not any(a == "-DGGML_NATIVE=ON" or ("AMX" in a and a.endswith("=ON")) for a in args)
    # an option is ON only when the CPU has every flag it compiles for (GGML_AVX512 needs F, CD, VL, DQ and BW)
    args = llamacpp.isa_arguments(_XEON_FLAGS - {"avx512bw"})
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_AVX2=ON" in args
    # not x86: -march=native, still without AMX
    assert llamacpp.isa_arguments(None) == ["-DGGML_NATIVE=ON", *llamacpp.AMX_OFF]


def test_a_cached_server_of_another_configuration_is_built_again(tmp_path, monkeypatch):
    version = llamacpp.LLAMA_CPP_PYTHON_VERSION
    binary = tmp_path / "bin" / f"llama-server-{version}"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")  # answers --version
    binary.chmod(0o755)
    record = binary.with_name(binary.name + ".build.json")
    configure = llamacpp.configure_arguments(tmp_path / "src", tmp_path / "build", llamacpp.cpu_flags())
    record.write_text(json.dumps(llamacpp._build_record(version, configure)))
    assert llamacpp.build_server(tmp_path, progress=lambda _: None) == binary  # same configuration: reused
    monkeypatch.setattr(llamacpp.shutil, "which", lambda _: None)  # a rebuild stops at the first missing tool
    stale = json.loads(record.read_text())
    stale["configure"] = [a for a in stale["configure"] if "AMX" not in a]
    for text in (json.dumps(stale), None):  # another configuration; no record (a binary built before records)
        if text is None:
            record.unlink()
        else:
            record.write_text(text)
        with pytest.raises(llamacpp.PeerUnavailable, match="cmake"):
            llamacpp.build_server(tmp_path, progress=lambda _: None)


def test_tokenizer_check_takes_a_tokenizer_json(tmp_path):
    from conftest import copy_test_hf_tokenizer
    from mstriton.tokenizer import load_tokenizer

    copy_test_hf_tokenizer(tmp_path)
    ours = load_tokenizer(tmp_path)

    class Agrees:
        def tokenize(self, text):
            return ours.encode(text)

    class AddsBos(Agrees):
        def tokenize(self, text):
            return [1] + ours.encode(text)

    texts = ["The quick brown fox", "MindSpore graphs served by Triton"]
    llamacpp.check_tokenizer(Agrees(), texts, tmp_path / "tokenizer.json")
    llamacpp.check_tokenizer(Agrees(), texts, ours)
    with pytest.raises(AssertionError, match="first difference at 0"):
        llamacpp.check_tokenizer(AddsBos(), texts, tmp_path)


def test_gguf_conversion_needs_a_vocabulary_and_a_type_the_converter_writes(tmp_path):
    assert {"f32", "f16", "bf16", "q8_0"} == set(llamacpp.GGUF_DTYPES)
    with pytest.raises(ValueError, match="dtype"):
        llamacpp.convert_to_gguf(tmp_path, tmp_path / "x.gguf", "q4_1")  # needs llama-quantize: never written
    with pytest.raises(llamacpp.PeerUnavailable, match="tokenizer.json"):
        llamacpp.convert_to_gguf(tmp_path, tmp_path / "x.gguf", "f16")


def test_a_cached_perplexity_tool_of_the_servers_configuration_is_reused(tmp_path, monkeypatch):
    version = llamacpp.LLAMA_CPP_PYTHON_VERSION
    configure = llamacpp.configure_arguments(tmp_path / "src", tmp_path / "build", llamacpp.cpu_flags())
    record = json.dumps(llamacpp._build_record(version, configure))
    (tmp_path / "bin").mkdir()
    for name in ("llama-server", "llama-perplexity"):
        binary = tmp_path / "bin" / f"{name}-{version}"
        binary.write_text("#!/bin/sh\nexit 0\n")  # answers --version
        binary.chmod(0o755)
        binary.with_name(binary.name + ".build.json").write_text(record)
    assert llamacpp.build_perplexity(tmp_path, progress=lambda _: None) == binary
    # another configuration than the server's: built again (here it stops at the missing source)
    binary.with_name(binary.name + ".build.json").write_text("{}")
    monkeypatch.setattr(llamacpp, "fetch_source", lambda *a, **k: tmp_path / "elsewhere")
    with pytest.raises(llamacpp.PeerUnavailable, match="perplexity"):
        llamacpp.build_perplexity(tmp_path, progress=lambda _: None)
