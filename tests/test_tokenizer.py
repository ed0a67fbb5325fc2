"""Incremental detokenization: the pieces of a stream join to the whole text, spaces and UTF-8 intact."""

from __future__ import annotations

import random

import pytest

from conftest import STREAM_TEXT, train_byte_fallback_tokenizer

from mstriton.tokenizer import ChatTemplate, TemplateError, TextTokenizer, load_tokenizer, stream_window

TEXT = STREAM_TEXT


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_byte_fallback_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def stream(tokenizer: TextTokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.piece(stream_window(ids[:n]), final=(n == len(ids))) for n in range(1, len(ids) + 1)]


@pytest.mark.parametrize("text", TEXT)
def test_stream_of_a_text_joins_to_the_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.sp.is_byte(i) for i in ids) or text.isascii()
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces), pieces


def test_random_token_streams_join_to_the_whole_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


@pytest.mark.parametrize("interval", [2, 3, 8, 13])
def test_streams_of_several_tokens_per_piece_join_to_the_whole_decode(tokenizer, interval):
    """stream_interval: the first token alone, then `interval` at a time, the last piece whatever is left."""
    rng = random.Random(interval)
    for text in TEXT + ["".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(30)) for _ in range(20)]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        ends = sorted({1, *range(1 + interval, len(ids), interval), len(ids)})
        pieces = [tokenizer.piece(stream_window(ids[:end], end - start), final=(end == len(ids)), new=end - start)
                  for start, end in zip([0] + ends, ends)]
        assert "".join(pieces) == tokenizer.decode(ids), text


def test_multibyte_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("🚀", add_special_tokens=False)
    byte_ids = [i for i in ids if tokenizer.sp.is_byte(i)]
    assert len(byte_ids) == 4
    pieces = stream(tokenizer, ids)
    assert pieces[-1].endswith("🚀") and all(p in ("", " ", "▁") or "🚀" in p for p in pieces)


def test_named_templates_render_one_user_message_as_the_text_templates_they_were():
    def one_turn(name):
        return ChatTemplate.named(name).render([{"role": "user", "content": "hi"}])

    assert one_turn("llama2") == "[INST] hi [/INST]"
    assert one_turn("internlm") == "<|User|>:hi<eoh>\n<|Bot|>:"
    assert one_turn("chatml") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TemplateError, match="llama2"):
        ChatTemplate.named("vicuna")


def test_a_tokens_own_text_keeps_its_leading_space(tokenizer):
    """TGI's details.tokens[].text and OpenAI's logprobs tokens: a token's text as it stands in the output, so a
    sentencepiece word token ("▁an") keeps its space (decoded alone, sentencepiece drops it), and the texts of an
    ASCII sentence's tokens join to the sentence (after its first token)."""
    from mstriton.serving.token_details import TokenDetails

    details = TokenDetails(tokenizer)
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text, add_special_tokens=False)
    texts = [details.text_of(i)[0] for i in ids]
    assert any(t.startswith(" ") for t in texts), texts
    assert "".join(texts).strip() == text and "".join(texts[1:]) == tokenizer.decode(ids)[len(texts[0].strip()):]
