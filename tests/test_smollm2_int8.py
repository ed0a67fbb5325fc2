"""SmolLM2 served as `make run` serves it: the converter's default for Q4_1 weights, int8 activations (the
products quantize each row per block of 32, as llama.cpp does; benchmarks/activation_fidelity.md compares the
quality). Not token-for-token transformers' (test_smollm2_server.py checks that on the float32 path); here the
answers must be ones transformers itself rates as likely as its own greedy answers, and the override by
MSTRITON_KERNEL_ACTIVATIONS must reach the decode model."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import copy_of_repository
from test_smollm2_server import CHAT, MAX_TOKENS, QUESTION, grpc_stream


@pytest.fixture(scope="module")
def int8_server(smollm2_repository, tmp_path_factory):
    from mstriton.repository import read_config
    from mstriton.server_process import running_server

    root = tmp_path_factory.mktemp("smollm2-int8")
    repository = copy_of_repository(smollm2_repository, root / "repo")
    assert read_config(repository / "smollm2_decode").parameters["kernel_activations"].string_value == "int8"
    with running_server(repository, root / "server.log") as triton:
        yield triton


def gaps(reference, messages, answer_ids: list[int]) -> np.ndarray:
    """For each answer token, how far (in nats) transformers, fed the same answer so far, rates it below its own
    best next token: 0 where transformers' greedy choice is the same."""
    prompt = reference.chat_ids(messages)
    rows = reference.log_softmax(prompt + answer_ids)[len(prompt) - 1:-1]
    return np.array([row.max() - row[token] for row, token in zip(rows, answer_ids)])


def test_the_decode_model_runs_int8_activations(int8_server):
    assert "int8 activations in the CPU kernels' products (the model's kernel_activations parameter)" in \
        int8_server.log.read_text(errors="replace")


@pytest.mark.parametrize("messages", [QUESTION, CHAT], ids=["question", "chat"])
def test_int8_answers_are_as_likely_for_transformers_as_its_own(int8_server, smollm2_reference, messages):
    pieces, reasons = grpc_stream(int8_server, messages)
    answer = "".join(pieces)
    assert reasons[-1] in ("end_id", "length") and answer.strip()
    # No "Paris" here: on this file the float32 path's first token wins by 0.09 logits ("The" over "L"), and int8
    # activations answer "L'Étoile, la Marseillaise, ..." -- as llama.cpp's llama-server does on the same file
    # (2026-12-07, temperature 0), word for word.
    ours = smollm2_reference.text_ids(answer)
    behind = gaps(smollm2_reference, messages, ours)
    print(f"{answer!r}: nats behind transformers' best, mean {behind.mean():.3f}, max {behind.max():.3f}")
    # Every token is one transformers itself nearly chose: int8 activations move logits by tenths, so a near-tie
    # may go the other way (then the answers part, each step still near-best along its own path). A broken
    # product (a wrong scale, a shifted block) picks tokens transformers rates nats below its best.
    assert behind.mean() < 0.15 and behind.max() < 1.0
