"""The converter: command line, repository layout, protobuf configs, atomic replacement, float16 export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from mstriton.convert import convert
from mstriton.repository import read_config

QUIET = dict(progress=lambda _: None)


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_cli_converts_with_progress_and_writes_loadable_configs(tmp_path, hf_checkpoint_factory):
    checkpoint = hf_checkpoint_factory("mha")
    result = run_cli("--checkpoint", checkpoint, "--name", "tiny", "--model-repository", tmp_path,
                     "--max-batch-size", "2", "--max-seq-len", "128")
    assert result.returncode == 0, result.stderr
    assert "exported decode graph 4/4" in result.stdout and "converted tiny" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny", "tiny_decode", "tiny_pipeline", "tiny_prefill", "tiny_sampler", "tiny_tokenizer", "tiny_unary"]
    for folder in tmp_path.iterdir():
        config = read_config(folder)
        assert config.name == folder.name
        if config.platform != "ensemble":
            assert config.backend == "python" and (folder / "1" / "model.py").exists()
    assert read_config(tmp_path / "tiny_pipeline").platform == "ensemble"
    assert read_config(tmp_path / "tiny_decode").model_transaction_policy.decoupled
    assert read_config(tmp_path / "tiny").model_transaction_policy.decoupled
    # the prefill model runs the decode model's engine folder (no second copy of the weights)
    prefill = read_config(tmp_path / "tiny_prefill")
    assert (tmp_path / "tiny_prefill/1" / prefill.parameters["engine"].string_value).resolve() == \
        (tmp_path / "tiny_decode/1/engine").resolve()
    assert prefill.dynamic_batching.max_queue_delay_microseconds > 0
    assert list(prefill.dynamic_batching.preferred_batch_size) == [2]  # min(8 prompts a call, max_batch_size)
    assert [i.allow_ragged_batch for i in prefill.input] == [True, False]  # input_ids, params_json
    decode_engine = tmp_path / "tiny_decode/1/engine"  # the decode model runs every graph
    assert sorted(p.name for p in decode_engine.glob("decode_*.mindir")) == [
        "decode_b1_s128.mindir", "decode_b1_s64.mindir", "decode_b2_s128.mindir", "decode_b2_s64.mindir"]
    assert (decode_engine / "prefill.mindir").exists() and (decode_engine / "prefill_chunk.mindir").exists()
    assert (tmp_path / "tiny_tokenizer/1/tokenizer.model").exists()
    manifest = json.loads((decode_engine / "manifest.json").read_text())
    assert manifest["max_seq_len"] == 128 and manifest["batch_buckets"] == [1, 2]


def test_cli_reports_bad_arguments_by_name(tmp_path, hf_checkpoint_factory):
    checkpoint = hf_checkpoint_factory("mha")
    result = run_cli("--checkpoint", checkpoint, "--name", "tiny", "--model-repository", tmp_path,
                     "--max-seq-len", "100000")
    assert result.returncode == 2 and "max_seq_len must be in [1, 256]" in result.stderr
    assert not any(p.name.startswith("tiny") for p in tmp_path.iterdir())
    result = run_cli("--checkpoint", tmp_path / "nowhere", "--name", "tiny", "--model-repository", tmp_path)
    assert result.returncode == 2 and "nowhere" in result.stderr


def test_rerun_replaces_the_model_and_a_failed_run_leaves_it_untouched(tmp_path, hf_checkpoint_factory):
    checkpoint = hf_checkpoint_factory("mha")
    convert(checkpoint, "m", tmp_path, max_batch_size=1, max_seq_len=64, **QUIET)
    (tmp_path / "m_decode" / "1" / "engine" / "stale.txt").write_text("from the previous conversion")
    (tmp_path / "other_model").mkdir()
    (tmp_path / "m_detokenizer" / "1").mkdir(parents=True)  # a step earlier versions wrote
    assert (tmp_path / "m_prefill").exists() and (tmp_path / "m_sampler").exists()  # the default shape's
    convert(checkpoint, "m", tmp_path, max_batch_size=2, max_seq_len=64, shape="colocated", **QUIET)
    assert not (tmp_path / "m_decode" / "1" / "engine" / "stale.txt").exists()
    assert not any((tmp_path / gone).exists() for gone in ("m_detokenizer", "m_prefill", "m_sampler"))
    assert json.loads((tmp_path / "m_decode/1/engine/manifest.json").read_text())["max_batch_size"] == 2
    assert (tmp_path / "other_model").exists()

    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        convert(checkpoint, "m", tmp_path, max_batch_size=0, max_seq_len=64, **QUIET)
    with pytest.raises(ValueError, match=r"--shape must be one of \['disaggregated', 'colocated'\], got 'split'"):
        convert(checkpoint, "m", tmp_path, max_batch_size=1, max_seq_len=64, shape="split", **QUIET)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_float16_engine_runs_close_to_float32(tmp_path, hf_checkpoint_factory):
    from mstriton.engine.engine import Engine
    from mstriton.engine.graphs import EngineGraphs

    checkpoint = hf_checkpoint_factory("mha")
    logits = {}
    for dtype in ("float32", "float16"):
        convert(checkpoint, dtype, tmp_path, max_batch_size=1, max_seq_len=64, dtype=dtype, **QUIET)
        engine = Engine(EngineGraphs(tmp_path / f"{dtype}_decode/1/engine"), kv_cache_bytes=4 << 20)
        _, first = engine.prefill_prompts([[1, 5, 9, 22]])
        second = engine.decode([int(first[0].argmax())])
        logits[dtype] = np.concatenate([first, second])
    assert logits["float16"].dtype == np.float32
    scale = np.abs(logits["float32"]).max()
    assert np.abs(logits["float16"] - logits["float32"]).max() / scale < 2e-2


# ---- config.json variants the converter refuses, each by the field at fault -----------------------------------

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=10, hidden_size=8,
             intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
QWEN2 = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("raw, message", [
    ({**LLAMA, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     r"'rope_scaling'.*'yarn'"),
    ({**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"'rope_scaling'.*'dynamic'"),
    ({**LLAMA, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, r"'rope_parameters'.*'longrope'"),
    ({**QWEN2, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"'rope_parameters'.*'yarn'"),
    ({**LLAMA, "rope_scaling": {"type": "linear"}}, r"'rope_scaling'.*'factor'"),
    ({**LLAMA, "rope_parameters": {"rope_type": "linear", "factor": 0}}, r"'rope_parameters'.*'factor'"),
    ({**LLAMA, "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}},
     r"'rope_scaling'.*'low_freq_factor'"),
    ({**LLAMA, "rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, r"'rope_scaling'.*'high_freq_factor'"),
    ({**LLAMA, "rope_parameters": {"full_attention": {"rope_type": "default"}}}, r"'rope_parameters'"),
    ({**LLAMA, "partial_rotary_factor": 0.5}, r"'partial_rotary_factor'"),
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 4096}, r"'use_sliding_window'"),
    ({**QWEN2, "layer_types": ["sliding_attention"]}, r"'layer_types'"),
    ({**LLAMA, "hidden_act": "gelu_pytorch_tanh"}, r"'hidden_act'"),
    ({**QWEN2, "hidden_act": "gelu"}, r"'hidden_act'"),
    ({**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}, r"'architectures'.*Mistral"),
    ({**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, r"'architectures'.*Qwen3"),
    ({**LLAMA, "head_dim": 5}, r"'head_dim'"),
    ({**LLAMA, "head_dim": 0}, r"'head_dim'"),
    ({**LLAMA, "eos_token_id": [2, "3"]}, r"'eos_token_id'"),
])
def test_refused_config_variants_name_the_field(raw, message):
    from mstriton.config import ConfigError, LlamaConfig

    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_dict(raw)


def test_refused_config_stops_the_converter_before_writing(tmp_path, hf_checkpoint_factory):
    import shutil
    from mstriton.config import ConfigError

    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint_factory("mha"), folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"'rope_parameters'.*'yarn'"):
        convert(folder, "m", tmp_path / "repo", max_batch_size=1, max_seq_len=64, **QUIET)
    assert not any(p.name.startswith("m_") for p in (tmp_path / "repo").glob("*"))
