"""NAME_detokenizer: stateless incremental detokenization of one streamed token; passes the decode model's
other outputs through so that every ensemble response comes whole from this last step."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ..tokenizer import Tokenizer
from . import common

PASS_THROUGH = ("token", "logprob", "cum_logprob", "finish_reason", "num_input_tokens",
                "num_output_tokens", "is_final")


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
                final = bool(common.get(request, "is_final").reshape(-1)[0])
                piece = self.tokenizer.piece(window, final=final) if window else ""
                outputs = [common.bytes_tensor("text_output", [piece])]
                outputs += [pb_utils.Tensor(name, common.get(request, name)) for name in PASS_THROUGH]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # noqa: BLE001
                responses.append(common.error_response(exc))
        return responses
