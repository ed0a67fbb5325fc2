"""What the converter takes from a checkpoint folder: the tokenizer (tokenizer.json preferred over
tokenizer.model), the chat template (the model's own, or the one named at conversion), and every end id."""

from __future__ import annotations

import json

import pytest

from conftest import copy_test_tokenizer, save_random_hf_llama
from mstriton.sources import read_source


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random LLaMA with SmolLM2's tokenizer files (rebuilt from its GGUF) and a Llama-3-style list of end ids."""
    from mstriton.model.gguf import open_reader
    from mstriton.model.gguf_tokenizer import tokenizer_files
    from mstriton.pretrained import smollm2_gguf

    folder = save_random_hf_llama(tmp_path_factory.mktemp("hf-tokenizer"), vocab_size=49152, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2)
    for name, text in tokenizer_files(open_reader(smollm2_gguf())).items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


def test_a_tokenizer_json_folder_serves_its_tokenizer_template_and_every_end_id(hf_folder):
    source = read_source(hf_folder)
    assert source.tokenizer_entry == "tokenizer.json"
    assert set(source.tokenizer_files) >= {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert "<|im_start|>" in source.chat_template
    assert source.end_ids == [2, 0]  # generation_config's list; config.json's eos (2) and the tokenizer's are in it


def test_tokenizer_json_wins_over_tokenizer_model_and_a_named_template_overrides(hf_folder, tmp_path):
    copy_test_tokenizer(hf_folder)  # a tokenizer.model beside tokenizer.json, as many Llama 2 folders have
    try:
        source = read_source(hf_folder, template="llama2")
        assert source.tokenizer_entry == "tokenizer.json" and "tokenizer.model" not in source.tokenizer_files
        assert "[INST]" in source.chat_template
        template = tmp_path / "mine.jinja"
        template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        assert read_source(hf_folder, template=str(template)).chat_template == template.read_text()
    finally:
        (hf_folder / "tokenizer.model").unlink()


def test_a_sentencepiece_folder_has_no_chat_template_unless_named(hf_checkpoint_factory):
    folder = hf_checkpoint_factory("sources-sp")
    source = read_source(folder)
    assert source.tokenizer_entry == "tokenizer.model" and source.chat_template is None and source.end_ids == [2]
    assert read_source(folder, template="chatml").chat_template.startswith("{% for message in messages %}")


def test_a_folder_without_tokenizer_or_with_a_broken_template_is_refused(tmp_path, hf_folder):
    bare = save_random_hf_llama(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*tokenizer.model"):
        read_source(bare)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="does not compile"):
        read_source(hf_folder, template=str(broken))
