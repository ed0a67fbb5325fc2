"""NAME_decode (decoupled): continuous batching over the KV-cache pool; one response per generated token.

A request carries its prompt's KV cache and first token; it joins the running batch at the next step and
streams until it finishes. A request holding only `stop_key` cancels the running request of that key (the
front model sends it when its client cancels or sends stop).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ..engine.engine import Engine, warm_up
from ..engine.graphs import EngineGraphs
from ..params import GenerationParams
from ..serving.metrics import DecodeMetrics
from ..serving.scheduler import DecodeRequest, Scheduler, ServerBusy, TokenEvent
from ..tokenizer import DETOKENIZE_WINDOW, stream_window
from . import common

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class ClientGone(RuntimeError):
    pass


def event_response(event: TokenEvent, prompt_tail: list[int]) -> "pb_utils.InferenceResponse":
    # The window reaches back into the prompt, so the first piece keeps the space that joins it to the prompt.
    window = stream_window(prompt_tail + event.output_ids) if event.token >= 0 else []
    final = event.finish_reason is not None
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.array([window], np.int32).reshape(1, -1)),
        common.scalar_tensor("token", event.token, np.int32),
        common.scalar_tensor("logprob", event.logprob, np.float32),
        common.scalar_tensor("cum_logprob", event.cum_logprob, np.float32),
        common.bytes_tensor("finish_reason", [event.finish_reason or ""]),
        common.scalar_tensor("num_input_tokens", event.num_input_tokens, np.int32),
        common.scalar_tensor("num_output_tokens", len(event.output_ids), np.int32),
        common.scalar_tensor("is_final", final, np.bool_),
    ])


class TritonPythonModel:
    def initialize(self, args):
        config = common.model_config(args)
        graphs = EngineGraphs(common.version_dir(args) / common.parameter(config, "engine", "engine"),
                              device=common.parameter(config, "device"),
                              device_id=int(common.parameter(config, "device_id", "0")))
        engine = Engine(graphs, max_slots=int(common.parameter(config, "max_slots", str(graphs.max_batch_size))))
        warm_up(engine)
        self.metrics = DecodeMetrics(pb_utils, model=args["model_name"])
        self.scheduler = Scheduler(engine, max_waiting=int(common.parameter(config, "max_waiting", "64")),
                                   on_step=self.metrics.on_step, on_state=self.metrics.on_queue)
        self.scheduler.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            stop_key = common.get(request, "stop_key")
            if stop_key is not None:
                found = self.scheduler.cancel(common.text(request, "stop_key"))
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    common.scalar_tensor("is_final", found, np.bool_)]), flags=FINAL)
                continue
            try:
                self.scheduler.submit(self.decode_request(request, sender))
            except ServerBusy as exc:
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)),
                    flags=FINAL)
            except Exception as exc:  # noqa: BLE001
                sender.send(common.error_response(exc), flags=FINAL)
            self.metrics.on_queue(self.scheduler)
        return None

    def decode_request(self, request, sender) -> DecodeRequest:
        words = common.json_input(request, "word_ids")
        prompt_ids = common.get(request, "input_ids").reshape(-1).tolist()
        prompt_tail = prompt_ids[-(DETOKENIZE_WINDOW + 1):]

        def emit(event: TokenEvent) -> None:
            if sender.is_cancelled():  # a direct client cancelled: end its stream, free the slot
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    "request cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
                raise ClientGone()
            if event.error:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    event.error, pb_utils.TritonError.UNAVAILABLE)), flags=FINAL)
                return
            sender.send(event_response(event, prompt_tail), flags=FINAL if event.finish_reason else 0)

        kv_keys, kv_values = common.get(request, "kv_keys")[0], common.get(request, "kv_values")[0]
        return DecodeRequest(
            key=common.text(request, "request_key"),
            prompt_ids=prompt_ids,
            first_token=int(common.get(request, "first_token").reshape(-1)[0]),
            first_logprob=float(common.get(request, "first_logprob").reshape(-1)[0]),
            keys=list(kv_keys), values=list(kv_values),
            params=GenerationParams(**common.json_input(request, "params_json")),
            emit=emit, end_ids=tuple(words["end_ids"]), stop_words=words["stop"], bad_words=words["bad"])

    def finalize(self):
        self.scheduler.shutdown("the server is shutting down; generation stopped")

