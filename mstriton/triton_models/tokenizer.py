"""NAME_tokenizer: a prompt, or chat messages through the chat template, -> token ids; stop/bad words -> ids;
the range checks that need the prompt's length. A prompt too large in bytes to fit in max_seq_len tokens is
refused before it is tokenized."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from ..params import GenerationParams, check_prompt_fits
from ..serving.prompt import PromptEncoder
from ..serving.shutdown import stacks_on_request
from . import common


class TritonPythonModel:
    def initialize(self, args):
        stacks_on_request()  # kill -USR1: every thread's stack in the log
        config = common.model_config(args)
        self.encoder = PromptEncoder.from_config_parameters(common.version_dir(args), config.get("parameters", {}))
        self.max_token_bytes = self.encoder.tokenizer.max_token_bytes  # computed now, not on the first request

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                fields, messages = common.read_request_json(request)
                text = common.text(request, "text_input")
                # a chat's text is at least its messages' contents (the template adds to them)
                size = len(text.encode("utf-8")) if messages is None else \
                    sum(len(m["content"].encode("utf-8")) for m in messages)
                check_prompt_fits("text_input" if messages is None else "messages", size, self.encoder.max_seq_len,
                                  self.max_token_bytes)
                encoded = self.encoder.encode(text, GenerationParams(**fields), messages)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("input_ids", np.array([encoded.ids], np.int32)),
                    pb_utils.Tensor("input_length", np.array([[len(encoded.ids)]], np.int32)),
                    common.bytes_tensor("params_json", [json.dumps(encoded.params_dict)]),
                    common.bytes_tensor("word_ids", [json.dumps(encoded.words)]),
                ]))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's refusal, as data
                responses.append(pb_utils.InferenceResponse(output_tensors=common.refusal_tensors(exc)))
        return responses
