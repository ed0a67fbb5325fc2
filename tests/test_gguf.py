"""GGUF import: our dequantization against the gguf package's, the SmolLM2 file against transformers' own GGUF reader
(weights, config, tokenizer), and the refusals, on small GGUF files written here with gguf.GGUFWriter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T

from mstriton.model.gguf import GGUFError, dequantize, read_gguf
from mstriton.model.gguf_tokenizer import tokenizer_files

SUPPORTED = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ---- dequantization ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_equals_gguf_package(qtype):
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((7, 5 * 32)) * rng.uniform(0.01, 30, size=(7, 1))).astype(np.float32)  # 7 rows, 5 blocks
    x[0, :32] = 0.0           # an all-zero block (d = 0)
    x[1, 32:64] = 1e-8        # a constant block
    x[2, 64:96] *= 300        # large values (f16 scales up to ~1e4)
    stored = gguf.quants.quantize(x, qtype)
    reference = np.asarray(gguf.quants.dequantize(stored, qtype), dtype=np.float32)
    ours = dequantize(stored, qtype)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(bits(ours), bits(reference))
    # the same bytes, flat, with the shape given (as read_gguf passes them)
    flat = np.ascontiguousarray(stored).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(bits(dequantize(flat, int(qtype), x.shape)), bits(reference))


def test_refused_type_names_tensor_and_type():
    _, type_size = gguf.GGML_QUANT_SIZES[T.IQ4_NL]
    raw = np.zeros((3, type_size), np.uint8)
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_down\.weight.*IQ4_NL"):
        dequantize(raw, T.IQ4_NL, name="blk.0.ffn_down.weight")


# ---- small synthetic GGUF files ---------------------------------------------------------------------------------

def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what a byte-level vocabulary is spelled in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER = ["<think>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ Ġ"]


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + byte_alphabet() + ["Ġt", "he", "Ġthe", "ĠĠ"] + USER
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - len(USER)) + [4] * len(USER)
    return tokens, types


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """What convert_hf_to_gguf.py does to q_proj / k_proj rows (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 256, 2  # FFN: one Q6_K block per ffn_down row


def hf_tensors(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    t = {"model.embed_tokens.weight": r(vocab, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if not tied:
        t["lm_head.weight"] = r(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": r(HIDDEN), p + "post_attention_layernorm.weight": r(HIDDEN),
                  p + "self_attn.q_proj.weight": r(HEADS * head_dim, HIDDEN),
                  p + "self_attn.k_proj.weight": r(KV_HEADS * head_dim, HIDDEN),
                  p + "self_attn.v_proj.weight": r(KV_HEADS * head_dim, HIDDEN),
                  p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * head_dim),
                  p + "mlp.gate_proj.weight": r(FFN, HIDDEN), p + "mlp.up_proj.weight": r(FFN, HIDDEN),
                  p + "mlp.down_proj.weight": r(HIDDEN, FFN)})
    return t


def gguf_name(hf: str) -> str:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in names:
        return names[hf]
    _, _, i, rest = hf.split(".", 3)
    part = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
            "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
            "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
            "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    return f"blk.{i}.{part[rest]}.weight"


def write_gguf(path: Path, arch: str = "llama", tied: bool = True, tokenizer_model: str = "gpt2",
               pre: str | None = "smollm", add_bos: bool | None = False, extra=None,
               tensor_type: dict[str, T] | None = None) -> dict[str, np.ndarray]:
    """A tiny llama GGUF as llama.cpp's converter writes it (Q/K rows permuted); returns the HF tensors."""
    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tokenizer_model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for step in extra or []:
        step(w)
    tensors = hf_tensors(len(tokens), tied)
    for name, value in tensors.items():
        stored = value
        if name.endswith("q_proj.weight"):
            stored = llamacpp_permute(value, HEADS, HEADS)
        elif name.endswith("k_proj.weight"):
            stored = llamacpp_permute(value, HEADS, KV_HEADS)
        qtype = (tensor_type or {}).get(gguf_name(name))
        if qtype is None:
            w.add_tensor(gguf_name(name), stored)
        elif qtype == T.IQ4_NL:  # a type we refuse, and the gguf package cannot quantize: right-sized bytes do
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(gguf_name(name), np.zeros((stored.shape[0], stored.shape[1] // block * size), np.uint8),
                         raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_synthetic_file_round_trips(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, tied=False, extra=[lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                                   lambda w: w.add_rope_scaling_factor(4.0)])
    lines = []
    model = read_gguf(path, progress=lines.append)
    assert any("reading tiny.gguf" in line and "tensors" in line for line in lines)
    assert model.config["tie_word_embeddings"] is False and "lm_head.weight" in model.tensors
    assert model.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert model.config["rope_theta"] == 500000.0 and model.config["rms_norm_eps"] == 1e-6
    assert "head_dim" not in model.config
    assert set(model.tensors) == set(expected)
    for name, value in expected.items():  # F32 throughout: exact, Q/K permutation undone
        np.testing.assert_array_equal(model.tensors[name], value, err_msg=name)


def test_synthetic_file_tied_and_quantized(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, tensor_type={"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_1,
                                             "blk.1.attn_k.weight": T.Q5_0})
    model = read_gguf(path, progress=None)
    assert model.config["tie_word_embeddings"] is True and "lm_head.weight" not in model.tensors
    assert model.tensor_types["model.embed_tokens.weight"] == "Q8_0"
    for name, tol in (("model.embed_tokens.weight", 0.05), ("model.layers.0.self_attn.q_proj.weight", 0.5),
                      ("model.layers.1.self_attn.k_proj.weight", 0.3)):
        assert np.abs(model.tensors[name] - expected[name]).max() < tol, name  # quantization error only


def test_head_dim_from_key_length(tmp_path):
    from mstriton.model.gguf import hf_config, read_metadata
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    metadata = read_metadata(gguf.GGUFReader(str(path)))
    assert "head_dim" not in hf_config(metadata)
    metadata["llama.attention.key_length"] = metadata["llama.attention.value_length"] = 32
    assert hf_config(metadata)["head_dim"] == 32


# ---- refusals ----------------------------------------------------------------------------------------------------

def test_unsupported_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_gguf(path, arch="qwen2")
    with pytest.raises(GGUFError, match=r"general\.architecture.*'qwen2'"):
        read_gguf(path, progress=None)


def test_unsupported_tensor_type_refused_before_work(tmp_path):
    path = tmp_path / "k.gguf"
    write_gguf(path, tensor_type={"blk.1.ffn_down.weight": T.IQ4_NL})
    lines = []
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_down\.weight.*IQ4_NL"):
        read_gguf(path, progress=lines.append)
    assert not any("dequantizing" in line for line in lines)


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_unsupported_tokenizer_model(tmp_path, model):
    path = tmp_path / "t.gguf"
    write_gguf(path, tokenizer_model=model)
    with pytest.raises(GGUFError, match=rf"tokenizer\.ggml\.model.*'{model}'"):
        tokenizer_files(gguf.GGUFReader(str(path)))
    # the weights still read; only the tokenizer is refused
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.model"):
        _ = read_gguf(path, progress=None).tokenizer_files


def test_unknown_pre_tokenizer(tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(path, pre="no-such-pre")
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.pre.*'no-such-pre'"):
        tokenizer_files(gguf.GGUFReader(str(path)))


# ---- the rebuilt tokenizer on a synthetic vocabulary ---------------------------------------------------------------

def _tokenizer(path: Path):
    from tokenizers import Tokenizer
    files = tokenizer_files(gguf.GGUFReader(str(path)))
    return Tokenizer.from_str(files["tokenizer.json"]), files


def test_tokenizer_added_tokens_and_no_bos(tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(path)
    tk, files = _tokenizer(path)
    tokens, _ = tiny_vocab()
    ids = tk.encode("<|im_start|> the<think>", add_special_tokens=True).ids
    assert ids == [1, tokens.index("Ġthe"), tokens.index("<think>")]  # no BOS: add_bos_token is false
    added = {t.content: t.special for t in tk.get_added_tokens_decoder().values()}
    assert added == {**dict.fromkeys(SPECIALS, True), "<think>": False}
    config = json.loads(files["tokenizer_config.json"])
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and config["model_max_length"] == 256
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in config
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": 2}


def test_tokenizer_bos_and_stop_tokens(tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(path, add_bos=True, extra=[lambda w: w.add_eot_token_id(0)])
    tk, files = _tokenizer(path)
    assert tk.encode(" the", add_special_tokens=True).ids[0] == 1
    assert tk.encode(" the", add_special_tokens=False).ids[0] != 1
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": [2, 0]}
    # Llama 3's pre-tokenizer: llama.cpp adds BOS when the file does not say
    path = tmp_path / "l3.gguf"
    write_gguf(path, pre="llama-bpe", add_bos=None)
    tk, files = _tokenizer(path)
    assert tk.encode(" the").ids[0] == 1 and json.loads(files["tokenizer_config.json"])["add_bos_token"] is True


# ---- the real model: SmolLM2-135M-Instruct Q4_1 against transformers' GGUF reader ----------------------------------

@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    from mstriton.pretrained import smollm2_gguf
    try:
        return smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return read_gguf(smollm2_path, progress=None)


@pytest.fixture(scope="module")
def hf_state_dict(smollm2_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def our_tokenizer(ours):
    from tokenizers import Tokenizer
    return Tokenizer.from_str(ours.tokenizer_files["tokenizer.json"])


def test_smollm2_config(ours):
    c = ours.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (49152, 576, 1536, 30)
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (9, 3)
    assert c["max_position_embeddings"] == 8192 and c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == 1e-5
    assert c["tie_word_embeddings"] is True and (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert "head_dim" not in c and "rope_scaling" not in c
    assert ours.tensor_types["model.embed_tokens.weight"] == "Q8_0"
    assert ours.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert ours.tensor_types["model.norm.weight"] == "F32"


def test_smollm2_tensors_equal_transformers(ours, hf_state_dict):
    assert "lm_head.weight" not in ours.tensors  # tied: transformers' lm_head is the embedding itself
    np.testing.assert_array_equal(hf_state_dict["lm_head.weight"], hf_state_dict["model.embed_tokens.weight"])
    assert set(ours.tensors) == set(hf_state_dict) - {"lm_head.weight"}
    for name, value in ours.tensors.items():
        assert value.dtype == np.float32 and value.shape == hf_state_dict[name].shape, name
        # atol 1e-6 on weights of order 0.1: a missed Q/K un-permutation would be off by whole weights
        np.testing.assert_allclose(value, hf_state_dict[name], rtol=0, atol=1e-6, err_msg=name)


# Texts on which llama.cpp's `smollm` pre-tokenizer (digits split singly, then GPT-2's regex) and transformers' GGUF
# tokenizer (GPT-2's regex only: transformers 5.24 has no `smollm` entry in GGUF_PRE_TOKENIZER_SPLITS) must agree.
# The vocabulary has no token with two digits, nor a space joined to a digit, so splitting digits first changes
# nothing... except after a run of two or more whitespace characters: GPT-2's ` ?\p{N}+` takes the run's last
# space with the digits (`a  1` -> `a`,`Ġ`,`Ġ1` -> ids a Ġ Ġ 1), while with the digits split first the whole run is
# one piece (`a`,`ĠĠ`,`1`). SmolLM2's own tokenizer.json (Digits(individual_digits=True), then ByteLevel) does the
# latter, as llama.cpp does; our tokenizer follows them, and DIGITS_AFTER_SPACES checks that case against it.
AGREE = ["Hello world", "  leading, multiple   spaces\t\ttabs\n\n\nnewlines  \n trailing  ",
         "12345 and 3.14159", "x = 1+2*3; y=(40-5)/6", "中文测试：日本語のテキスト、한국어", "emoji 😀👍🏽 🇫🇷!",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "It's don't WE'LL you've", "<|endoftext|>end"]
DIGITS_AFTER_SPACES = ["a  1 b   22", "x\n\n  12", "\t\t7 and\n\n3"]


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_smollm2_tokenizer_equals_transformers(our_tokenizer, hf_tokenizer, add_special_tokens):
    for text in AGREE:
        ids = our_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        assert ids == hf_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"], text
        assert our_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert our_tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids[:1] == [1]


def test_smollm2_digits_after_whitespace_follow_smollm2(our_tokenizer, hf_tokenizer):
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer (its tokenizer.json's) put in."""
    from tokenizers import Tokenizer, pre_tokenizers
    reference = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    for text in DIGITS_AFTER_SPACES + AGREE:
        ids = our_tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert our_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert our_tokenizer.encode("a  1").tokens == ["a", "ĠĠ", "1"]


def test_smollm2_tokenizer_files(ours, hf_tokenizer, tmp_path):
    from transformers import AutoTokenizer
    files = ours.tokenizer_files
    config = json.loads(files["tokenizer_config.json"])
    assert {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")} == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>"}
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["model_max_length"] == 8192 and config["chat_template"].startswith("{% for message in messages %}")
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": 2}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))  # the folder as transformers reads it
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert loaded("hi there 42")["input_ids"] == hf_tokenizer("hi there 42")["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
