"""NAME_sampler: the first token of each request from its prompt's logits, with the request's own settings."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ..engine.sampling import SamplingState, choose_tokens
from ..params import GenerationParams
from . import common


def sampling_state(request) -> SamplingState:
    words = common.json_input(request, "word_ids")
    return SamplingState(params=GenerationParams(**common.json_input(request, "params_json")),
                         end_ids=tuple(words["end_ids"]), prompt_ids=common.get(request, "input_ids").reshape(-1)
                         .tolist(), bad_words=words["bad"])


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        try:
            states = [sampling_state(r) for r in requests]
            logits = np.concatenate([common.get(r, "logits").reshape(1, -1) for r in requests])
            tokens, logprobs, tops = choose_tokens(logits, states)
        except Exception as exc:  # noqa: BLE001
            return [common.error_response(exc) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=common.first_token_tensors(int(t), float(lp), top))
                for t, lp, top in zip(tokens, logprobs, tops)]
