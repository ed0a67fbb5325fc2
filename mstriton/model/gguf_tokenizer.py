"""Rebuild a Hugging Face tokenizer folder from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary (tokenizer.ggml.tokens, token_type), the merges and the
special token ids under llama.cpp's keys, and names the pre-tokenizer only by a label (tokenizer.ggml.pre) that
llama.cpp maps to a list of split regexes in llama-vocab.cpp. We write the tokenizer llama.cpp runs on that file:

- model: byte-level BPE from the tokens and merges (`ignore_merges` where llama.cpp sets it: the Llama 3 family);
- pre-tokenizer: llama.cpp's regexes for the label, each an isolating Split applied in turn, then the byte-level
  mapping (the regex of ByteLevel itself off: the Splits already did that work);
- decoder: byte-level;
- added tokens: CONTROL tokens (token type 3) as special, USER_DEFINED ones (type 4) as plain added tokens, both
  matched whole wherever they are written in a text, as llama.cpp does;
- post-processor: BOS before the text (and EOS after) only when tokenizer.ggml.add_bos_token (add_eos_token) says
  so, or, when the file does not say, where llama.cpp adds it by default.

Only byte-level BPE vocabularies (tokenizer.ggml.model 'gpt2') are supported; sentencepiece ('llama') ones and
others are refused with GGUFError, as are pre-tokenizer labels not in PRE_TOKENIZERS.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .gguf import GGUFError, read_metadata

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (enum llama_token_type)

# llama.cpp's regexes (llama-vocab.cpp, llm_tokenizer_bpe), written for Oniguruma, which the tokenizers library
# uses: the Llama 3 and Qwen2 ones in llama.cpp's case-insensitive-free spelling of the original.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGIT_SPLIT = r"\p{N}"  # every digit on its own


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[str, ...]
    ignore_merges: bool = False   # a word that is a whole token is taken as it is, before any merge
    add_bos: bool = False         # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token
    clean_spaces: bool = True     # llama.cpp's clean_spaces: transformers' clean_up_tokenization_spaces


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = PreTokenizer((GPT2_SPLIT,))
_DIGITS_GPT2 = PreTokenizer((DIGIT_SPLIT, GPT2_SPLIT))
_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((QWEN2_SPLIT,), clean_spaces=False)

# tokenizer.ggml.pre -> what llama.cpp does for it (llama_vocab::impl::load and llm_tokenizer_bpe)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _GPT2),
    "smollm": dataclasses.replace(_DIGITS_GPT2, clean_spaces=False),
    "command-r": dataclasses.replace(_DIGITS_GPT2, clean_spaces=False),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "minerva-7b"), _DIGITS_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3_SPLIT,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan"), _QWEN2),
    **dict.fromkeys(("megrez", "stablelm2"), dataclasses.replace(_QWEN2, clean_spaces=True)),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, r"[0-9][0-9][0-9]")),
}


def pre_tokenizer_of(metadata: dict) -> tuple[str, PreTokenizer]:
    # llama.cpp reads a missing label as 'default' (and warns that the output will be worse)
    label = metadata.get("tokenizer.ggml.pre") or "default"
    if label not in PRE_TOKENIZERS:
        raise GGUFError(f"metadata field 'tokenizer.ggml.pre' is {label!r}, a pre-tokenizer this import does not "
                        f"know; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    return label, PRE_TOKENIZERS[label]


def _split_merge(merge: str) -> tuple[str, str]:
    # llama.cpp: the first space after the first character separates the two parts
    at = merge.find(" ", 1)
    if at < 0:
        raise GGUFError(f"metadata field 'tokenizer.ggml.merges' has an entry without a space: {merge!r}")
    return merge[:at], merge[at + 1:]


def _token(tokens: list[str], metadata: dict, key: str) -> str | None:
    token_id = metadata.get(key)
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise GGUFError(f"metadata field '{key}' is {token_id}, outside the {len(tokens)} tokens")
    return tokens[int(token_id)]


def _flag(metadata: dict, key: str, default: bool) -> bool:
    value = metadata.get(key)
    return default if value is None else bool(value)


def build_tokenizer_json(metadata: dict) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"metadata field 'tokenizer.ggml.model' is {model!r}; only 'gpt2' (byte-level BPE) "
                        "tokenizers are supported" + (" (sentencepiece 'llama' vocabularies are not)"
                                                      if model == "llama" else ""))
    _, pre = pre_tokenizer_of(metadata)
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise GGUFError("the file has no metadata field 'tokenizer.ggml.tokens'")
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"metadata field 'tokenizer.ggml.token_type' has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    merges = [_split_merge(m) for m in metadata.get("tokenizer.ggml.merges") or []]

    try:
        bpe = BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges,
                  ignore_merges=pre.ignore_merges, fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # the library raises plain Exceptions for merges the vocabulary lacks
        raise GGUFError(f"the vocabulary and merges of the file do not make a BPE model: {exc}") from exc
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, kind in zip(tokens, types) if kind == USER_DEFINED])

    add_bos = _flag(metadata, "tokenizer.ggml.add_bos_token", pre.add_bos)
    add_eos = _flag(metadata, "tokenizer.ggml.add_eos_token", False)
    around: dict[str, tuple[str, int]] = {}
    for wanted, key in ((add_bos, "tokenizer.ggml.bos_token_id"), (add_eos, "tokenizer.ggml.eos_token_id")):
        if wanted:
            text = _token(tokens, metadata, key)
            if text is None:
                raise GGUFError(f"the file asks for {key.split('.')[-1].split('_')[0]} tokens to be added but has "
                                f"no metadata field '{key}'")
            around[key] = (text, int(metadata[key]))
    if around:
        bos = around.get("tokenizer.ggml.bos_token_id")
        eos = around.get("tokenizer.ggml.eos_token_id")
        head = f"{bos[0]}:0 " if bos else ""
        tail = f" {eos[0]}:0" if eos else ""
        tail1 = f" {eos[0]}:1" if eos else ""
        head1 = f"{bos[0]}:1 " if bos else ""
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail} {head1}$B:1{tail1}",
                                          special_tokens=sorted(set(around.values()), key=lambda t: t[1]))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk.to_str(pretty=True)


def _chat_template(metadata: dict) -> str | list[dict] | None:
    default = metadata.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = [{"name": key[len(prefix):], "template": value} for key, value in sorted(metadata.items())
             if key.startswith(prefix) and isinstance(value, str)]
    if not named:
        return default
    return ([{"name": "default", "template": default}] if default else []) + named


def tokenizer_config(metadata: dict) -> dict[str, Any]:
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    _, pre = pre_tokenizer_of(metadata)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
                      ("unk_token", "tokenizer.ggml.unknown_token_id"),
                      ("pad_token", "tokenizer.ggml.padding_token_id")):
        text = _token(tokens, metadata, key)
        if text is not None:
            config[name] = text
    config["add_bos_token"] = _flag(metadata, "tokenizer.ggml.add_bos_token", pre.add_bos)
    config["add_eos_token"] = _flag(metadata, "tokenizer.ggml.add_eos_token", False)
    config["clean_up_tokenization_spaces"] = pre.clean_spaces
    arch = metadata.get("general.architecture")
    if arch and metadata.get(f"{arch}.context_length") is not None:
        config["model_max_length"] = int(metadata[f"{arch}.context_length"])
    template = _chat_template(metadata)
    if template:
        config["chat_template"] = template
    return config


def generation_config(metadata: dict) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if metadata.get("tokenizer.ggml.bos_token_id") is not None:
        config["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"])
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    stops = [int(eos)] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if metadata.get(key) is not None and int(metadata[key]) not in stops:
            stops.append(int(metadata[key]))
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return config


def tokenizer_files(reader_or_metadata) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json (file name -> JSON text) for the tokenizer a
    GGUF file describes; the argument is a gguf.GGUFReader or the file's metadata as a dict (read_metadata)."""
    metadata = read_metadata(reader_or_metadata) if hasattr(reader_or_metadata, "fields") else reader_or_metadata
    return {
        "tokenizer.json": build_tokenizer_json(metadata),
        "tokenizer_config.json": json.dumps(tokenizer_config(metadata), indent=2, ensure_ascii=False) + "\n",
        "generation_config.json": json.dumps(generation_config(metadata), indent=2) + "\n",
    }
