"""Choosing the next token, per request: greedy or sampling with its own temperature, top-k, top-p, min-p,
penalties, logit biases, seed, minimum length, banned words and grammar (structured_output.py: the tokens the
grammar does not allow are out before anything else). The decode model runs this same code for a prompt's first
token and for every decode step.

Nothing is shared between the rows of a batch: each request carries its settings and its own random generator,
so a seeded request gives the same tokens whatever runs beside it. Log-probabilities are true log-softmax values
of the model's distribution (before temperature and cuts), for the chosen token and, when a request asks for
them, for its `top_logprobs` most likely tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..params import GenerationParams, logit_biases

# Top-p looks at this many best tokens first; only when their mass is below top_p does it sort the vocabulary.
NUCLEUS_CANDIDATES = 64


@dataclasses.dataclass(eq=False)
class SamplingState:
    """What sampling remembers about one sequence between steps."""
    params: GenerationParams
    end_ids: tuple[int, ...]
    prompt_ids: list[int]
    bad_words: list[list[int]] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    counts: dict[int, int] = dataclasses.field(default_factory=dict)
    rng: np.random.Generator | None = None
    matcher: object = None  # the request's grammar (an llguidance LLMatcher), fed every chosen token
    bias_ids: np.ndarray | None = None
    bias_values: np.ndarray | None = None

    def __post_init__(self):
        if not self.params.greedy:
            self.rng = np.random.default_rng(self.params.seed)
        if self.params.logit_bias:
            biases = logit_biases(self.params.logit_bias)
            self.bias_ids = np.fromiter(biases, np.int64, len(biases))
            self.bias_values = np.fromiter(biases.values(), np.float32, len(biases))

    def record(self, token: int) -> None:
        self.generated.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.matcher is not None:
            self.matcher.consume_token(token)

    @property
    def processed(self) -> bool:
        """Whether its logits are changed before choosing (else the row is read as the model gave it)."""
        p = self.params
        return (p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
                or bool(self.bad_words) or len(self.generated) < p.min_tokens or self.bias_ids is not None
                or self.matcher is not None)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _apply_penalties(row: np.ndarray, state: SamplingState) -> None:
    p = state.params
    if p.repetition_penalty != 1.0:  # as in transformers: over prompt and output, divide positive, scale negative
        seen = np.fromiter(set(state.prompt_ids) | set(state.counts), np.int64)
        seen = seen[(seen >= 0) & (seen < row.size)]
        values = row[seen]
        row[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and state.counts:  # as in OpenAI's API: output tokens only
        tokens = np.fromiter(state.counts, np.int64)
        counts = np.fromiter(state.counts.values(), np.float32)
        row[tokens] -= p.presence_penalty + p.frequency_penalty * counts


def _apply_bias(row: np.ndarray, state: SamplingState) -> None:
    if state.bias_ids is not None:
        inside = state.bias_ids < row.size
        row[state.bias_ids[inside]] += state.bias_values[inside]


def _apply_bans(row: np.ndarray, state: SamplingState) -> None:
    if len(state.generated) < state.params.min_tokens:
        row[list(state.end_ids)] = -np.inf
    for word in state.bad_words:  # ban the word's last token where the output ends with the rest of the word
        head = word[:-1]
        if not head or state.generated[-len(head):] == head:
            row[word[-1]] = -np.inf


def _sample_row(row: np.ndarray, state: SamplingState) -> int:
    p = state.params
    scaled = row / p.sampling_temperature
    if p.min_p > 0.0:  # as vLLM: below min_p times the most likely token's probability is out
        scaled = np.where(scaled >= scaled.max() + np.log(p.min_p), scaled, -np.inf)
    if p.top_k and p.top_k < scaled.size:
        candidates = np.argpartition(-scaled, p.top_k - 1)[:p.top_k]
    else:
        candidates = None
    if p.top_p < 1.0:
        pool = candidates if candidates is not None else np.argpartition(
            -scaled, min(NUCLEUS_CANDIDATES, scaled.size) - 1)[:NUCLEUS_CANDIDATES]
        full_mass = np.exp(scaled - scaled.max())
        total = full_mass.sum() if candidates is None else full_mass[candidates].sum()
        order = pool[np.argsort(-scaled[pool], kind="stable")]
        cumulative = np.cumsum(full_mass[order]) / total
        if cumulative[-1] < p.top_p and candidates is None:  # nucleus wider than the first candidates: sort all
            order = np.argsort(-scaled, kind="stable")
            cumulative = np.cumsum(full_mass[order]) / total
        keep = int(np.searchsorted(cumulative, p.top_p)) + 1
        candidates = order[:keep]
    if candidates is None:
        candidates = np.arange(scaled.size)
    weights = np.exp(scaled[candidates] - scaled[candidates].max())
    weights = weights / weights.sum()
    choice = int(np.searchsorted(np.cumsum(weights), state.rng.random() * weights.sum() * (1 - 1e-12)))
    return int(candidates[min(choice, candidates.size - 1)])


_MASKS = None


def _grammar_masks():
    global _MASKS
    if _MASKS is None:
        from .structured_output import GrammarMasks  # llguidance, loaded with the first grammar
        _MASKS = GrammarMasks()
    return _MASKS


def top_logprobs(row: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token, log-probability) of one row of log-probabilities, most likely first."""
    k = min(k, row.size)
    best = np.argpartition(-row, k - 1)[:k]
    best = best[np.argsort(-row[best], kind="stable")]
    return [(int(t), float(row[t])) for t in best]


def choose_tokens(logits: np.ndarray, states: list[SamplingState]
                  ) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, float]]]]:
    """For each row of logits [n, V] (float32): the next token, its log-probability, and the request's
    top_logprobs alternatives (an empty list unless it asked)."""
    logprobs = log_softmax(logits.astype(np.float32))
    tokens = np.empty(len(states), np.int64)
    constrained = [i for i, s in enumerate(states) if s.matcher is not None]
    masks = dict(zip(constrained, _grammar_masks().allowed([states[i].matcher for i in constrained],
                                                           logits.shape[1]))) if constrained else {}
    for i, state in enumerate(states):
        p = state.params
        processed = state.processed
        row = logits[i].astype(np.float32, copy=True) if processed else logits[i]
        if processed:
            _apply_bias(row, state)
            _apply_penalties(row, state)
            _apply_bans(row, state)
        if state.matcher is not None:
            mask = masks[i]
            row[~mask] = -np.inf
            if not mask.any():  # the matcher failed (it allows nothing): end the output here
                row = np.full_like(row, -np.inf)
                row[state.end_ids[0]] = 0.0
            elif not np.isfinite(row).any():  # the bans took what the grammar left (min_tokens before its end)
                row = np.where(mask, 0.0, -np.inf).astype(np.float32)
        tokens[i] = int(row.argmax()) if p.greedy else _sample_row(row, state)
    chosen = logprobs[np.arange(len(states)), tokens]
    tops = [top_logprobs(logprobs[i], s.params.top_logprobs) if s.params.top_logprobs else []
            for i, s in enumerate(states)]
    return tokens, chosen, tops
