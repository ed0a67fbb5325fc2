"""Shared fixtures: tiny random LLaMA checkpoints saved by Hugging Face transformers, converted by our converter."""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import json
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# ---- the `slow` mark: what `make test-fast` (pytest -m "not slow") leaves out ---------------------------------------
# A test is slow when its code, or the code of a fixture it uses (directly or through other fixtures), starts
# tritonserver or the frontend, converts (exports graphs), trains a model, or loads transformers / torch: each costs
# seconds to minutes, where a unit test takes milliseconds. Read from the code (docstrings and comments left out),
# so a new test that does one of these is marked without anyone remembering to. `make test` runs every test.
SLOW_CODE = re.compile(
    r"(?<![\w.])(running_server|running_frontend|serving_streaming_checkpoint|save_streaming_checkpoint"
    r"|save_random_hf_\w+|greedy_reference|SmolLM2Reference|convert|export_engine|build_demo_model)\("
    r"|^\s*(import|from) (torch|transformers)\b|importorskip\('(torch|transformers)'\)"
    r"|'tritonserver'",  # a tritonserver started by hand (test_install)
    re.MULTILINE)


@functools.lru_cache(maxsize=None)
def _is_slow_code(func) -> bool:
    """Whether a test's or a fixture's own code (not its docstring or comments) does something SLOW_CODE names."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return bool(SLOW_CODE.search(ast.unparse(tree)))


def _ours(func) -> bool:
    """Defined under tests/ (pytest's own fixtures, tmp_path and the like, are not read)."""
    try:
        return TESTS in Path(inspect.getsourcefile(func)).resolve().parents
    except TypeError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts tritonserver or the frontend, converts or trains a model, or loads "
                                       "transformers / torch (make test-fast leaves these out)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        funcs = [getattr(item, "obj", None)]
        for name in getattr(item, "fixturenames", ()):
            funcs += [d.func for d in item._fixtureinfo.name2fixturedefs.get(name, ())]
        if any(f is not None and _ours(f) and _is_slow_code(f) for f in funcs):
            item.add_marker(pytest.mark.slow)


def _save_random(model_class, config_class, folder: Path, seed: int, settings: dict) -> Path:
    """A random model of `model_class` saved as a Hugging Face folder (config.json, model.safetensors), with
    weights (biases too) scaled up from transformers' 0.02 init so that logits differ clearly between tokens."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config_class(**settings)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


RANDOM_MODEL_SETTINGS = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def save_random_hf_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM saved as a Hugging Face folder (see _save_random)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_random(LlamaForCausalLM, LlamaConfig, folder, seed, {**RANDOM_MODEL_SETTINGS, **overrides})


def copy_test_tokenizer(folder: Path) -> None:
    """Any sentencepiece model serves the engine tests; train a tiny one on fixed text."""
    import io
    import sentencepiece as spm

    text = ("MindSpore graphs served by Triton stream tokens to every client. " * 4 +
            "The quick brown fox jumps over the lazy dog while the cache grows. " * 4).split(". ")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buffer, vocab_size=60,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())


STREAM_TEXT = [
    "Streaming keeps every space, and every word arrives whole.",
    "MindSpore 图模式 在 Triton 上 流式 输出 中文 文本。",
    "Emoji too: 🚀 launches, 🎉 celebrates, 👍🏽 agrees.",
    "  leading spaces, double  spaces and a tab\there.",
    "Numbers 3.14159 and symbols #@!& stay put.",
]


def train_byte_fallback_tokenizer(path: Path) -> Path:
    """A sentencepiece model trained on the ASCII lines only, so Chinese and emoji go through byte fallback
    (the hard case for streaming detokenization)."""
    import io
    import sentencepiece as spm

    buffer = io.BytesIO()
    ascii_lines = [t for t in STREAM_TEXT if t.isascii()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(ascii_lines * 3), model_writer=buffer, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return path


def save_streaming_checkpoint(root: Path, max_position_embeddings: int = 256) -> Path:
    """A random checkpoint whose vocabulary is exactly the byte-fallback tokenizer's, for the server tests: every
    generated id has text, including byte tokens that must be joined into whole characters."""
    import shutil
    import sentencepiece as spm

    tokenizer_file = train_byte_fallback_tokenizer(root / "tokenizer.model")
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_file)).get_piece_size()
    checkpoint = save_random_hf_llama(root / "ckpt", vocab_size=vocab, num_key_value_heads=2,
                                      max_position_embeddings=max_position_embeddings)
    shutil.copy(tokenizer_file, checkpoint / "tokenizer.model")
    return checkpoint


@pytest.fixture(scope="session")
def hf_checkpoint_factory(tmp_path_factory):
    """Build (once per config) a random HF checkpoint folder with a tokenizer."""
    cache = {}

    def make(key: str, **overrides) -> Path:
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{key}")
            save_random_hf_llama(folder, **overrides)
            copy_test_tokenizer(folder)
            cache[key] = folder
        return cache[key]

    return make


def greedy_reference(model, prompt: list[int], steps: int):
    """transformers' own greedy tokens and the logits of every step (full forward, no cache involved)."""
    import torch

    ids = torch.tensor([prompt])
    model.generation_config.eos_token_id = None  # random weights: never stop early, compare every step
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                   do_sample=False, pad_token_id=0)
        sequence = generated[0].tolist()
        logits = model(generated).logits[0].numpy()
    # logits[t] predicts token t+1: the ones of the prompt's last token and of each generated token.
    return sequence[len(prompt):], logits[len(prompt) - 1:len(sequence) - 1]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def engine_of(repository: Path, name: str, **engine_args):
    """An Engine over the converted model `name`'s engine: the graphs its decode model runs."""
    from mstriton.engine.engine import Engine
    from mstriton.engine.graphs import EngineGraphs

    return Engine(EngineGraphs(repository / f"{name}_decode" / "1" / "engine"), **engine_args)


def logit_errors(engine, reference, prompt: list[int], steps: int = 16) -> list[float]:
    """Relative errors of our logits against transformers' after prefill and after each of `steps` decode steps
    (fed transformers' own greedy tokens)."""
    expected_tokens, expected_logits = greedy_reference(reference, prompt, steps + 1)
    (sequence,), logits = engine.prefill_prompts([prompt])
    errors = [relative_error(logits[0], expected_logits[0])]
    for step in range(steps):
        logits = engine.decode([expected_tokens[step]])
        errors.append(relative_error(logits[0], expected_logits[step + 1]))
    engine.release(sequence)
    return errors


def cache_hit_errors(engine, shared: list[int], tails: tuple[list[int], list[int]], steps: int = 4) -> list[float]:
    """Relative logit errors (as relative_error), after prefill and `steps` greedy decode steps, between a prompt whose
    start the prefix cache holds (`shared` + tails[1], after `shared` + tails[0] ran) and the same prompt on a
    cold engine (prefix caching off, the same graphs). Also checks that the cache was hit."""
    from mstriton.engine.engine import Engine

    cold = Engine(engine.graphs, max_slots=1, kv_cache_bytes=64 << 20, enable_prefix_caching=False)
    warm = Engine(engine.graphs, max_slots=1, kv_cache_bytes=64 << 20)
    (first,), _ = warm.prefill_prompts([shared + tails[0]])
    warm.release(first)
    hits = warm.blocks.stats.prefix_hits
    (sequence,), warm_logits = warm.prefill_prompts([shared + tails[1]])
    assert warm.blocks.stats.prefix_hits - hits >= len(shared) // warm.blocks.block_size * warm.blocks.block_size
    (cold_sequence,), cold_logits = cold.prefill_prompts([shared + tails[1]])
    errors = [relative_error(warm_logits, cold_logits)]
    for _ in range(steps):
        token = int(cold_logits[0].argmax())
        warm_logits, cold_logits = warm.decode([token]), cold.decode([token])
        errors.append(relative_error(warm_logits, cold_logits))
    return errors


@contextlib.contextmanager
def serving_streaming_checkpoint(root: Path, max_batch_sizes: dict[str, int],
                                 decode_parameters: dict[str, dict[str, str]] | None = None,
                                 kv_cache_blocks: dict[str, int] | None = None, shapes: dict[str, str] | None = None,
                                 edits: dict | None = None):
    """The real tritonserver serving the streaming test checkpoint, converted once per name in
    `max_batch_sizes` (128 tokens per sequence); `server.checkpoint` is the checkpoint folder.
    `decode_parameters` {name: {key: value}} edits a decode model's config.pbtxt parameters, as a user would;
    `kv_cache_blocks` {name: blocks} sizes a decode model's KV pool (its kv_cache_bytes) in blocks; `shapes`
    {name: shape} converts a name in another shape than the default (repository.SHAPES); `edits` {model folder:
    function(ModelConfig)} changes any model's config.pbtxt."""
    from mstriton.convert import convert
    from mstriton.repository import read_config, write_config
    from mstriton.server_process import running_server

    checkpoint = save_streaming_checkpoint(root)
    repository = root / "repo"
    for name, max_batch_size in max_batch_sizes.items():
        convert(checkpoint, name, repository, max_batch_size=max_batch_size, max_seq_len=128,
                shape=(shapes or {}).get(name, "disaggregated"), progress=lambda _: None)
    decode_parameters = {name: dict(p) for name, p in (decode_parameters or {}).items()}
    for name, blocks in (kv_cache_blocks or {}).items():
        decode_parameters.setdefault(name, {})["kv_cache_bytes"] = str(pool_bytes_for(repository, name, blocks))
    for name, parameters in decode_parameters.items():
        folder = repository / f"{name}_decode"
        config = read_config(folder)
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        write_config(folder, config)
    for folder, edit in (edits or {}).items():
        config = read_config(repository / folder)
        edit(config)
        write_config(repository / folder, config)
    with running_server(repository, root / "server.log") as server:
        server.checkpoint = checkpoint
        yield server


def pool_bytes_for(repository: Path, name: str, blocks: int) -> int:
    """kv_cache_bytes of a pool of `blocks` usable blocks for the converted model `name`."""
    from mstriton.config import LlamaConfig
    from mstriton.engine.kv_pool import KVPool

    manifest = json.loads((repository / f"{name}_decode" / "1" / "engine" / "manifest.json").read_text())
    c = LlamaConfig.from_hf_dict(manifest["config"])
    return (blocks + 1) * KVPool.block_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                             manifest["kv_block_size"])


def save_random_hf_qwen2(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random Qwen2ForCausalLM saved as a Hugging Face folder, initialized as ``save_random_hf_llama`` does (its
    q/k/v biases too). Vocabulary 320 by default: room for ``copy_test_hf_tokenizer``'s byte-level tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _save_random(Qwen2ForCausalLM, Qwen2Config, folder, seed,
                        {**RANDOM_MODEL_SETTINGS, "vocab_size": 320, **overrides})


def copy_test_hf_tokenizer(folder: Path) -> None:
    """A tiny byte-level BPE tokenizer.json, the kind Qwen2 and Llama 3 ship, trained on fixed text; its end token
    <|endoftext|> is named in tokenizer_config.json."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["MindSpore graphs served by Triton stream tokens to every client.",
            "The quick brown fox jumps over the lazy dog while the cache grows."] * 4
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "bos_token": None}))


class SmolLM2Reference:
    """transformers on SmolLM2's GGUF file: its own GGUF reader, tokenizer, chat template and greedy generate."""

    def __init__(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from mstriton.pretrained import smollm2_gguf

        path = smollm2_gguf()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).eval()

    def chat_ids(self, messages) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The generated ids (the end token included when it comes)."""
        ids = self.torch.tensor([prompt_ids])
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def answer(self, messages, max_new_tokens: int) -> str:
        return self.decode(self.greedy(self.chat_ids(messages), max_new_tokens))

    def log_softmax(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab]: row i is the log-distribution of the token after ids[:i + 1]."""
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids])).logits[0].double()
        return self.torch.log_softmax(logits, dim=-1).numpy()


@pytest.fixture(scope="session")
def smollm2_reference():
    return SmolLM2Reference()


# Requests the SmolLM2 server queues beyond its 2 slots: small, so that tests can fill it and see "busy".
SMOLLM2_MAX_WAITING = 1


@pytest.fixture(scope="session")
def smollm2_repository(tmp_path_factory) -> Path:
    """SmolLM2 converted from its GGUF file as `make run` converts it (the file's own Q4_1 / Q8_0 blocks on the
    CPU kernels, served with the converter's default int8 activations), 2 slots of 512 tokens. Servers copy it."""
    from mstriton.convert import convert
    from mstriton.pretrained import smollm2_gguf

    repository = tmp_path_factory.mktemp("smollm2-converted") / "repo"
    convert(smollm2_gguf(), "smollm2", repository, max_batch_size=2, max_seq_len=512, weights="Q4_1",
            progress=lambda _: None)
    return repository


def copy_of_repository(source: Path, target: Path, **decode_parameters: str) -> Path:
    """A copy of a converted repository (hard links for the large files) with some decode parameters changed."""
    import shutil

    from mstriton.repository import read_config, write_config

    shutil.copytree(source, target, copy_function=os.link)
    decode = next(target.glob("*_decode"))
    config = read_config(decode)
    for key, value in decode_parameters.items():
        config.parameters[key].string_value = value
    (decode / "config.pbtxt").unlink()  # a hard link to the source's: write a file of its own
    write_config(decode, config)
    return target


@pytest.fixture(scope="session")
def smollm2_server(smollm2_repository, tmp_path_factory):
    """The real tritonserver serving SmolLM2 (smollm2_repository) with float32 activations, the exact path: its
    answers are compared with transformers' token for token. (tests/test_smollm2_int8.py serves the default.)"""
    from mstriton.server_process import running_server

    root = tmp_path_factory.mktemp("smollm2-server")
    repository = copy_of_repository(smollm2_repository, root / "repo", max_waiting=str(SMOLLM2_MAX_WAITING),
                                    kernel_activations="float32")
    with running_server(repository, root / "server.log") as triton:
        yield triton
