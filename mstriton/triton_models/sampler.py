"""NAME_sampler (disaggregated shape): each prompt's first token, from the prefill model's logits, with the request's
own settings, for the requests Triton's dynamic batcher merged (serving/first_token.py: the decode model's own
sampling code)."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ..serving.first_token import FirstToken, choose_first
from ..serving.shutdown import stacks_on_request
from . import common

NO_ROW = (np.zeros(0, np.float32), {}, {}, [])


class TritonPythonModel:
    def initialize(self, args):
        stacks_on_request()  # kill -USR1: every thread's stack in the log
        common.freeze_loaded_objects()

    def execute(self, requests):
        rows = []
        for request in requests:
            try:
                fields = common.json_input(request, "params_json")
                rows.append(NO_ROW if common.REFUSAL in fields else (
                    common.get(request, "logits").reshape(-1), fields, common.json_input(request, "word_ids"),
                    common.get(request, "input_ids").reshape(-1).tolist()))
            except Exception:  # noqa: BLE001 - malformed: decode answers it
                rows.append(NO_ROW)
        try:
            firsts = choose_first(rows)
        except Exception as exc:  # noqa: BLE001 - the decode model chooses instead (it has the prompts' KV)
            pb_utils.Logger.log_warn(f"sampler: {type(exc).__name__}: {exc}; the decode model computes the batch")
            firsts = [FirstToken() for _ in rows]
        return [pb_utils.InferenceResponse(output_tensors=[
            common.bytes_tensor("first_json", [first.to_json() if first.chosen else ""]),
            pb_utils.Tensor("first_logits", (first.logits if first.logits is not None
                                             else np.zeros(0, np.float32))[None])]) for first in firsts]
