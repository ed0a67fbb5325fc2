"""NAME_tokenizer: a prompt, or chat messages through the chat template, -> token ids; stop/bad words -> ids;
the range checks that need the prompt's length."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from ..params import GenerationParams
from ..serving.pipeline import PromptEncoder
from . import common


class TritonPythonModel:
    def initialize(self, args):
        config = common.model_config(args)
        self.encoder = PromptEncoder.from_config_parameters(common.version_dir(args), config.get("parameters", {}))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                fields, messages = common.read_request_json(request)
                encoded = self.encoder.encode(common.text(request, "text_input"), GenerationParams(**fields),
                                              messages)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("input_ids", np.array([encoded.ids], np.int32)),
                    pb_utils.Tensor("input_length", np.array([[len(encoded.ids)]], np.int32)),
                    common.bytes_tensor("params_json", [json.dumps(encoded.params_dict)]),
                    common.bytes_tensor("word_ids", [json.dumps(encoded.words)]),
                ]))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
                responses.append(common.error_response(exc))
        return responses
