"""The sampler model's work, testable without Triton: each prompt's first token, chosen from the prefill model's
last-token logits with the request's own settings by the same code the decode model runs for every later token
(engine/sampling.py), for a batch of requests at once.

What it hands the decode model (`first_json`): the token, its log-probability and its top_logprobs alternatives.
A request under a grammar is left to the decode model, which compiles the grammar off its loop anyway: the
sampler passes its logits on instead (`first_logits`), and decode chooses from them once the grammar is ready. A
request with no logits (no handover: decode computes the prompt itself) gets nothing.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from ..engine.sampling import SamplingState, choose_tokens
from ..params import GenerationParams

NOT_CHOSEN = -1


@dataclasses.dataclass
class FirstToken:
    token: int = NOT_CHOSEN
    logprob: float = 0.0
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    logits: np.ndarray | None = None  # the row decode chooses from (a grammar's request), else None
    sampled: bool = False  # drawn with the request's random generator (decode's generator skips that draw)

    @property
    def chosen(self) -> bool:
        return self.token != NOT_CHOSEN

    def to_json(self) -> str:
        return json.dumps({"token": self.token, "logprob": self.logprob, "top": self.top, "sampled": self.sampled})

    @classmethod
    def from_tensors(cls, first_json: str | None, logits: np.ndarray | None) -> "FirstToken | None":
        """What the decode model reads; None when the sampler gave nothing to go on."""
        logits = None if logits is None or logits.size == 0 else logits.reshape(-1).astype(np.float32)
        fields = json.loads(first_json) if first_json else {}
        token = int(fields.get("token", NOT_CHOSEN))
        if token == NOT_CHOSEN and logits is None:
            return None
        return cls(token=token, logprob=float(fields.get("logprob", 0.0)),
                   top=[(int(t), float(lp)) for t, lp in fields.get("top", [])], logits=logits,
                   sampled=bool(fields.get("sampled", False)))


def sampling_state(fields: dict, words: dict, prompt_ids: list[int], matcher=None) -> SamplingState:
    """A request's sampling state from the tokenizer step's outputs (params_json fields, word_ids)."""
    return SamplingState(params=GenerationParams(**fields), end_ids=tuple(words.get("end_ids", ())),
                         prompt_ids=prompt_ids, bad_words=words.get("bad", []), matcher=matcher)


def choose_first(rows: list[tuple[np.ndarray, dict, dict, list[int]]]) -> list[FirstToken]:
    """For each request (its logits [V] or empty, params_json fields, word_ids, prompt ids): its FirstToken."""
    results = [FirstToken() for _ in rows]
    batch = []
    for i, (logits, fields, words, prompt_ids) in enumerate(rows):
        if logits.size == 0:
            continue
        if fields.get("structured_outputs"):
            results[i] = FirstToken(logits=logits)
            continue
        batch.append((i, logits, sampling_state(fields, words, prompt_ids)))
    if batch:
        tokens, logprobs, tops = choose_tokens(np.stack([row for _, row, _ in batch]), [s for *_, s in batch])
        for (i, _, state), token, logprob, top in zip(batch, tokens, logprobs, tops):
            results[i] = FirstToken(token=int(token), logprob=float(logprob), top=top,
                                    sampled=not state.params.greedy)
    return results
