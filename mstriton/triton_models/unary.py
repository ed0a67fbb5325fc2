"""NAME_unary (not decoupled): one response per request, for KServe v2 /infer and HTTP /generate. Runs the NAME
front model through BLS with stream=false: the same path as streaming, joined there. The requests of one
execute() run concurrently as coroutines (see front.py for why not threads)."""

from __future__ import annotations

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

from ..repository import CLIENT_OUTPUTS
from ..serving.requests import parse_request
from . import common

OUTPUTS = [name for name, _, _ in CLIENT_OUTPUTS]


class TritonPythonModel:
    def initialize(self, args):
        config = common.model_config(args)
        self.llm = common.parameter(config, "llm_name")
        self.input_names = [i["name"] for i in config["input"]]

    async def execute(self, requests):
        return list(await asyncio.gather(*[self.complete(r) for r in requests]))

    async def complete(self, request):
        parameters = common.request_parameters(request)
        try:
            # The front model checks the same; checked here too, a refused request (a 10 MB prompt) is answered
            # before its inputs are copied into a BLS request and through tritonserver again.
            parse_request(lambda name: common.get(request, name), parameters)
        except Exception as exc:  # noqa: BLE001 - this request's error, never the whole batch's
            return common.error_response(exc)
        inputs = [pb_utils.Tensor(name, common.get(request, name)) for name in self.input_names
                  if name != "stream" and common.get(request, name) is not None]
        inputs.append(pb_utils.Tensor("stream", np.array([[False]])))
        call = pb_utils.InferenceRequest(model_name=self.llm, requested_output_names=OUTPUTS, inputs=inputs,
                                         parameters=parameters)
        result = error = None
        async for response in common.stream_responses(call):
            if response.has_error():
                error = error or response.error()
            elif response.output_tensors():
                result = response
        await common.release_finished_streams(request.is_cancelled)  # its iterator: serving/finished_streams.py
        if error is not None:
            return pb_utils.InferenceResponse(output_tensors=[], error=common.with_code_restored(error))
        if result is None:
            return common.failed_response("the generation ended without output", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=result.output_tensors())
