"""NAME_detokenizer: stateless incremental detokenization of one streamed token; passes the decode model's
other outputs (step_ints, step_floats) through so that every ensemble response comes whole from this last step."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ..tokenizer import Tokenizer
from . import common

PASS_THROUGH = ("step_ints", "step_floats")
IS_FINAL = common.STEP_INTS.index("is_final")


class TritonPythonModel:
    def initialize(self, args):
        config = common.model_config(args)
        self.tokenizer = Tokenizer(common.version_dir(args) / common.parameter(config, "tokenizer",
                                                                               "tokenizer.model"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                window = common.get(request, "output_ids").reshape(-1).tolist()
                ints = common.get(request, "step_ints")
                final = bool(ints.reshape(-1)[IS_FINAL])
                piece = self.tokenizer.piece(window, final=final) if window else ""
                outputs = [common.bytes_tensor("text_output", [piece]), pb_utils.Tensor("step_ints", ints),
                           pb_utils.Tensor("step_floats", common.get(request, "step_floats"))]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # noqa: BLE001
                responses.append(common.error_response(exc))
        return responses
