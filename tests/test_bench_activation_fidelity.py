"""The activation-fidelity benchmark's protocol pieces (bench/activation_fidelity.py): llama-perplexity's chunks
and scored positions, and reading the logits file its --kl-divergence-base writes."""

from __future__ import annotations

import numpy as np

from bench import activation_fidelity as af


def test_chunks_and_scored_positions_follow_llama_perplexity():
    tokens = list(range(10, 127))  # 117 tokens
    chunks = af.make_chunks(tokens, 29, add_bos=False, bos_id=None)
    assert len(chunks) == 4 and chunks[1] == tokens[29:58]  # the 117th token is dropped
    assert af.make_chunks(tokens, 29, add_bos=True, bos_id=1)[2][0] == 1  # BOS replaces each chunk's first token
    assert list(af.scored_positions(29)) == list(range(14, 28))  # 14 per chunk, as n_ctx - 1 - n_ctx / 2
    assert len(af.scored_positions(28)) == 13


def _write_logits_file(path, logits, tokens, n_ctx):
    """What llama-perplexity's log_softmax (tools/perplexity/perplexity.cpp) writes for each scored position."""
    n_rows, n_vocab = logits.shape
    nv = 2 * ((n_vocab + 1) // 2) + 4
    out = [b"_logits_", np.array([n_ctx, n_vocab, len(tokens) // n_ctx], np.int32).tobytes(),
           np.asarray(tokens, np.int32).tobytes()]
    for row in logits.astype(np.float32):
        mx = row.max()
        mn = max(row.min(), mx - 16)
        log_sum_exp = np.log(np.exp(row - mx).sum())
        scale = np.float32((mx - mn) / 65535)
        rec = np.zeros(nv, np.uint16)
        rec[:4] = np.array([scale, mn - mx - log_sum_exp], np.float32).view(np.uint16)
        rec[4:4 + n_vocab] = np.where(row > mn, np.rint((row - mn) / scale), 0)
        out.append(rec.tobytes())
    path.write_bytes(b"".join(out))


def test_reads_the_top_token_and_nll_of_a_logits_file(tmp_path):
    rng = np.random.default_rng(0)
    n_ctx, n_chunk, n_vocab = 8, 2, 11
    tokens = rng.integers(0, n_vocab, n_chunk * n_ctx)
    per_chunk = len(af.scored_positions(n_ctx))
    logits = rng.normal(0, 3, (n_chunk * per_chunk, n_vocab))
    _write_logits_file(tmp_path / "l", logits, tokens, n_ctx)
    got = af.read_logits_file(tmp_path / "l")
    assert (got["n_ctx"], got["n_vocab"], got["n_chunk"]) == (n_ctx, n_vocab, n_chunk)
    assert got["tokens"] == tokens.tolist()
    assert (got["top1"] == logits.argmax(-1)).all()
    targets = tokens.reshape(n_chunk, n_ctx)[:, n_ctx // 2 + 1:].reshape(-1)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(got["nll"], -logp[np.arange(len(targets)), targets], atol=1e-3)


def test_summary_is_llama_perplexitys_estimate():
    nll = np.array([1.0, 2.0, 3.0, 2.0])
    s = af.summary(nll)
    assert np.isclose(s["perplexity"], np.exp(2.0))
    assert np.isclose(s["perplexity_error"], np.exp(2.0) * np.sqrt(0.5 / 3))
