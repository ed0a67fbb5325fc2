"""NAME (decoupled): what clients call. Validates the request, runs the NAME_pipeline ensemble through BLS,
detokenizes each token it streams back, and streams the text to the client.

Why a front model instead of exposing the ensemble: tritonserver 2.51 does not pass a client's cancellation
into the steps of an ensemble. This model sees it (`is_cancelled()`), and tells the decode model to stop the
sequence, which frees its KV-cache slot at the next step. It also serves tensorrtllm_backend's explicit stop:
a request with `stop` true and the request id of a running request.

Every stream is a coroutine on the stub's event loop, never a thread of its own: decoupled BLS calls made from
several threads at once crashed tritonserver 2.51 (SIGSEGV, boost lock_exception in libtriton_python.so)
within seconds at four concurrent streams, while the same load on the ensemble alone ran clean.

Why detokenization is here and not a step after decode in the ensemble: on SIGTERM, tritonserver 2.51 stops
the schedulers of all models at once; an ensemble whose next step is then refused never completes, so the
server waited out its exit timeout and was killed. With decode as the last step, running streams finish.
It also saves every token one trip through a Triton model.

A method's front model (NAME_METHOD, its config's `method` parameter set; serving/methods.py) is this model with
the user's preprocess before the pipeline call and postprocess on the joined text before the last response.
"""

from __future__ import annotations

import faulthandler
import json
import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from ..serving.cancel_poll import CancelPoll
from ..serving.methods import METHOD_FILE, OUTPUT as METHOD_OUTPUT, MethodCalls, request_fields, wants_stop
from ..serving.metrics import RequestMetrics
from ..serving.requests import parse_request
from ..serving.shutdown import exit_watchdog, stacks_on_request
from ..serving.token_details import TokenDetails
from ..tokenizer import load_tokenizer
from . import common

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PIPELINE_OUTPUTS = ["output_ids", "step_ints", "step_floats", "finish_reason"]


class TritonPythonModel:
    def initialize(self, args):
        stacks_on_request()  # kill -USR1: every thread's stack in the log
        config = common.model_config(args)
        self.llm = common.parameter(config, "llm_name")
        self.tokenizer = load_tokenizer(common.version_dir(args) / common.parameter(config, "tokenizer",
                                                                                    "tokenizer.model"))
        self.details = TokenDetails(self.tokenizer)
        self.metrics: RequestMetrics | None = RequestMetrics(pb_utils, model=args["model_name"])
        self.metrics_lock = threading.Lock()  # finalize() lets go of the metrics (common.drop_metrics)
        self.active: dict[str, str] = {}  # client request id -> key of its running generation
        self.tasks = common.RequestTasks()  # running streams
        method = common.parameter(config, "method")
        # a method's file that fails to load fails every request of the method with the reason, never the server
        self.method = MethodCalls.load(common.version_dir(args) / METHOD_FILE, method) if method else None
        self.input_names = [i["name"] for i in config["input"]]
        common.freeze_loaded_objects()

    async def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            get = lambda name, request=request: common.get(request, name)  # noqa: E731
            try:
                if self.method is None:
                    parsed, fields = parse_request(get, common.request_parameters(request)), None
                    stop = parsed.stop
                else:  # the client's fields, read now; the method's preprocess makes the request in its task
                    parsed = None
                    fields = request_fields(get, self.input_names, common.request_parameters(request))
                    stop = wants_stop(fields)
            except Exception as exc:  # noqa: BLE001 - every request gets an answer (error_response picks the code)
                sender.send(common.error_response(exc), flags=FINAL)
                continue
            if stop:
                await self.explicit_stop(request, sender)
                continue
            self.tasks.start(self.generate(request, sender, parsed) if fields is None
                             else self.generate_method(request, sender, fields))
        return None

    async def generate_method(self, request, sender, fields: dict) -> None:
        """A method's request: its preprocess makes the request to generate (a failure is this request's error)."""
        try:
            parsed = await self.method.preprocess(fields)
        except Exception as exc:  # noqa: BLE001 - the user's function: this request's error, never the model's
            pb_utils.Logger.log_warn(f"{self.method.name}: {exc}")
            sender.send(common.error_response(exc), flags=FINAL)
            return
        await self.generate(request, sender, parsed, fields)

    async def explicit_stop(self, request, sender) -> None:
        key = self.active.get(request.request_id())
        if key is not None:
            await self.stop_decode(key)
        # before the final response, see serving/finished_streams.py
        await common.release_finished_streams(sender.is_cancelled)
        sender.send(pb_utils.InferenceResponse(output_tensors=[
            common.bytes_tensor("finish_reason", ["cancelled" if key else ""])]), flags=FINAL)

    async def stop_decode(self, key: str) -> None:
        stop = pb_utils.InferenceRequest(model_name=f"{self.llm}_decode", requested_output_names=["step_ints"],
                                         inputs=[common.bytes_tensor("stop_key", [key])])
        async for _ in common.stream_responses(stop):
            pass

    async def generate(self, request, sender, parsed, fields: dict | None = None) -> None:
        """`fields`: a method's request fields (postprocess gets them with the joined text)."""
        arrival, first, last = time.monotonic(), None, None
        client_id = request.request_id()
        key = f"{client_id or 'request'}-{uuid.uuid4().hex[:12]}"
        if client_id:
            self.active[client_id] = key
        params = parsed.params
        pipeline = pb_utils.InferenceRequest(
            model_name=f"{self.llm}_pipeline", requested_output_names=PIPELINE_OUTPUTS,
            inputs=[common.bytes_tensor("text_input", [parsed.text]),
                    common.bytes_tensor("params_json", [common.request_json(params, parsed.messages)]),
                    common.bytes_tensor("request_key", [key])])
        prefix = "" if params.exclude_input_in_output else parsed.text
        pieces, logprobs, tokens = [], [], []  # tokens: return_tokens' entries of a non-streamed request
        prompt_tokens = generated = 0
        reason, cancelled = "error", False
        # The client's final response waits until the pipeline's stream has ended and its iterator can be
        # dropped safely (serving/finished_streams.py): a final response ends the request, and with it the sender's
        # is_cancelled() that lets the iterator go.
        ending = None
        client_cancelled = CancelPoll(common.is_cancelled_releasing(sender.is_cancelled))
        try:
            async for response in common.stream_responses(pipeline):  # read to its end, whatever happens
                if ending is not None:
                    continue
                if response.has_error():
                    pb_utils.Logger.log_warn(f"{key}: the pipeline answered with an error: "
                                             f"{response.error().message()}")
                    ending = pb_utils.InferenceResponse(
                        output_tensors=[], error=common.with_code_restored(response.error()))
                    continue
                out = common.outputs_by_name(response)
                if not out:
                    continue
                if not cancelled and client_cancelled():
                    cancelled = True
                    await self.stop_decode(key)
                if cancelled:
                    reason = "cancelled"
                    continue
                step = common.read_step(out)
                finish = step["finish_reason"]
                if finish.startswith(common.STEP_ERROR):
                    ending = pb_utils.InferenceResponse(output_tensors=[], error=common.with_code_restored(
                        pb_utils.TritonError(finish[len(common.STEP_ERROR):], pb_utils.TritonError.UNAVAILABLE)))
                    continue
                now = time.monotonic()
                first = first or now
                last = now
                final = step["is_final"]
                window = out["output_ids"].reshape(-1).tolist()
                new = step["num_new_tokens"]
                # The end token's own text (a stop_token_id that is a plain token) is not part of the output, as in
                # vLLM; asked for special tokens (skip_special_tokens false), the end token is shown, as before
                left_out = 1 if finish == "end_id" and new and params.skip_special_tokens else 0
                piece = self.tokenizer.piece(window[:len(window) - left_out], final=final, new=new - left_out,
                                             skip_special_tokens=params.skip_special_tokens) if new else ""
                token_logprobs, cum = step["logprobs"], step["cum_logprob"]
                entries = self.details.entries(window[len(window) - new:], token_logprobs, step["tops"]) \
                    if params.return_tokens else None
                prompt_tokens, generated = step["num_input_tokens"], step["num_output_tokens"]
                if prefix:
                    piece, prefix = prefix + piece, ""
                if not params.stream or fields is not None:  # a method's postprocess gets the whole text
                    pieces.append(piece)
                if not params.stream:
                    logprobs += token_logprobs
                    tokens += entries or []
                if not final:
                    if params.stream:
                        sender.send(client_response([piece], token_logprobs, cum, finish, prompt_tokens, generated,
                                                    entries))
                    continue
                text, method_output = "".join(pieces), None
                if fields is not None:
                    try:
                        replaced, method_output = await self.method.postprocess(text, fields)
                    except Exception as exc:  # noqa: BLE001 - the user's function: this request's error
                        pb_utils.Logger.log_warn(f"{self.method.name}: {exc}")
                        ending = common.error_response(exc)
                        continue
                    # not streamed, its text_output replaces the text; streamed, the pieces are sent already
                    text = text if replaced is None else replaced
                if params.stream:
                    ending = client_response([piece], token_logprobs, cum, finish, prompt_tokens, generated, entries,
                                             method_output)
                else:
                    ending = client_response([text], logprobs, cum, finish, prompt_tokens, generated,
                                             tokens if params.return_tokens else None, method_output)
                reason = finish or "length"
            if ending is None and cancelled:
                ending = common.failed_response("request cancelled", pb_utils.TritonError.CANCELLED)
            elif ending is None:
                # The pipeline's stream can end with no response at all: tritonserver 2.51 does so for a
                # request it refuses while shutting down. The client's stream must still end.
                ending = common.failed_response(
                    "the generation ended before its last token (is the server shutting down?)",
                    pb_utils.TritonError.UNAVAILABLE)
            await common.release_finished_streams(sender.is_cancelled)
            sender.send(ending, flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - the stream must end with an error, never hang
            pb_utils.Logger.log_error(f"{key}: failed while streaming: {type(exc).__name__}: {exc}")
            try:
                sender.send(common.error_response(exc), flags=FINAL)
            except Exception:  # noqa: BLE001 - the client is gone
                pass
        finally:
            if client_id and self.active.get(client_id) == key:
                del self.active[client_id]
            with self.metrics_lock:
                if self.metrics is not None:
                    self.metrics.finished(arrival, first, last or time.monotonic(), prompt_tokens, generated, reason)

    def finalize(self):
        exit_watchdog(self.llm)  # first: finalize() itself may be what never ends
        common.drop_metrics(self)
        if self.method is not None:
            self.method.close()
        running = self.tasks.running()
        if running:  # a stream still waiting for the pipeline keeps a worker thread, and the process, alive
            pb_utils.Logger.log_warn(f"{self.llm}: {len(running)} streams still running at unload; their "
                                     f"requests: {sorted(self.active.values())[:8]}; the threads' stacks follow")
            faulthandler.dump_traceback(all_threads=True)


def client_response(pieces, logprobs, cum, finish, prompt_tokens, generated,
                    tokens: list[dict] | None = None, method_output: str | None = None) -> "pb_utils.InferenceResponse":
    """`tokens`: return_tokens' entries (serving/token_details.py), sent as tokens_json only when asked for;
    `method_output`: a method's postprocess result (JSON), on its last response."""
    extra = [common.bytes_tensor("tokens_json", [json.dumps(tokens)])] if tokens is not None else []
    if method_output is not None:
        extra.append(common.bytes_tensor(METHOD_OUTPUT, [method_output]))
    return pb_utils.InferenceResponse(output_tensors=extra + [
        common.bytes_tensor("text_output", pieces),
        pb_utils.Tensor("output_log_probs", np.array([logprobs], np.float32)),
        common.scalar_tensor("cum_log_probs", cum, np.float32),
        common.bytes_tensor("finish_reason", [finish]),
        common.scalar_tensor("num_input_tokens", prompt_tokens, np.int32),
        common.scalar_tensor("num_output_tokens", generated, np.int32),
    ])
