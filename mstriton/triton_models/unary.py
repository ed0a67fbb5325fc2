"""NAME_unary (not decoupled): one response per request, for KServe v2 /infer and HTTP /generate. Runs the NAME
front model through BLS with stream=false: the same path as streaming, joined there."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from . import common

OUTPUTS = ["text_output", "output_log_probs", "cum_log_probs", "finish_reason", "num_input_tokens",
           "num_output_tokens"]


class TritonPythonModel:
    def initialize(self, args):
        config = common.model_config(args)
        self.llm = common.parameter(config, "llm_name")
        self.input_names = [i["name"] for i in config["input"]]
        self.pool = ThreadPoolExecutor(max_workers=max(1, config.get("max_batch_size", 1)))

    def execute(self, requests):
        return list(self.pool.map(self.complete, requests))

    def complete(self, request):
        inputs = [pb_utils.Tensor(name, common.get(request, name)) for name in self.input_names
                  if name != "stream" and common.get(request, name) is not None]
        inputs.append(pb_utils.Tensor("stream", np.array([[False]])))
        call = pb_utils.InferenceRequest(model_name=self.llm, requested_output_names=OUTPUTS, inputs=inputs,
                                         parameters=common.request_parameters(request))
        result = error = None
        for response in call.exec(decoupled=True):  # read to the end: see front.drain
            if response.has_error():
                error = error or response.error()
            elif response.output_tensors():
                result = response
        if error is not None:
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        if result is None:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                "the generation ended without output", pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(output_tensors=result.output_tensors())
