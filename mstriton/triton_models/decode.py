"""NAME_decode (decoupled): the generation engine. It owns the paged KV cache (with its prefix cache) and batches
decoding continuously; one response per generated token, or per `stream_interval` tokens. In the disaggregated
shape a request comes with its prompt computed by NAME_prefill (a lease on blocks of the shared pool, whose
uncached blocks it copies into its own) and its first token chosen by NAME_sampler; otherwise (the colocated
shape, or a prompt the prefill model could not take) it prefills the prompt between decode steps and chooses the
first token itself.

A request carries its prompt's token ids and settings (from the tokenizer); it is admitted when its blocks are
free and streams until it finishes. A request holding only `stop_key` cancels the running request of that key (the
front model sends it when its client cancels or sends stop).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from ..engine.engine import Engine, warm_up, warm_up_prefill
from ..engine.graphs import EngineGraphs
from ..engine.shared_kv import Handover, RegionOpener, decode_handover, region_path
from ..engine.structured_output import GrammarCompiler, grammar_of
from ..kernels import activations
from ..params import DEFAULT_PREFILL_BUDGET, MAX_STREAM_INTERVAL, GenerationParams
from ..repository import model_name
from ..serving.cancel_poll import CancelPoll
from ..serving.first_token import FirstToken
from ..serving.metrics import DecodeMetrics
from ..serving.scheduler import DecodeRequest, Scheduler, TokenEvent
from ..serving.speculation import Speculation
from ..serving.shutdown import ShutdownWatch, exit_watchdog, stacks_on_request
from ..tokenizer import stream_window
from . import common

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class ClientGone(RuntimeError):
    pass


def event_response(event: TokenEvent, prompt_tail: list[int], logprobs: list[float],
                   tops: list[list[tuple[int, float]]] = ()) -> "pb_utils.InferenceResponse":
    """The response for `event` carrying the len(logprobs) newest tokens (0 for an end without a new token), with
    their top_logprobs alternatives when the request asked for them."""
    new = len(logprobs)
    # The front model detokenizes the new tokens from this window of ids (its last). The window reaches back
    # into the prompt, so the first piece keeps the space that joins it to the prompt.
    window = stream_window(prompt_tail + stream_window(event.output_ids, new), new) if new else []
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.array([window], np.int32).reshape(1, -1)),
        *common.step_tensors(num_input_tokens=event.num_input_tokens, num_output_tokens=len(event.output_ids),
                             final=event.finish_reason is not None, logprobs=logprobs,
                             cum_logprob=event.cum_logprob, finish_reason=event.finish_reason or "", tops=tops)])


def error_as_data(message: str, num_input_tokens: int = 0) -> "pb_utils.InferenceResponse":
    """A final response carrying an error in finish_reason (see common.STEP_ERROR for why not an error)."""
    return event_response(TokenEvent(token=-1, logprob=0.0, cum_logprob=0.0, output_ids=[],
                                     num_input_tokens=num_input_tokens,
                                     finish_reason=common.STEP_ERROR + message), [], [])


class TritonPythonModel:
    def initialize(self, args):
        stacks_on_request()  # kill -USR1: every thread's stack in the log
        config = common.model_config(args)
        mode, source = activations.apply_configured(common.parameter(config, "kernel_activations"))
        pb_utils.Logger.log_info(f"{args['model_name']}: {mode} activations in the CPU kernels' products ({source})")
        graphs = EngineGraphs(common.version_dir(args) / common.parameter(config, "engine", "engine"),
                              device=common.parameter(config, "device"),
                              device_id=int(common.parameter(config, "device_id", "0")))
        pool_bytes = common.parameter(config, "kv_cache_bytes", "")  # empty: a share of the machine's memory
        engine = Engine(graphs, max_slots=int(common.parameter(config, "max_slots", str(graphs.max_batch_size))),
                        kv_cache_bytes=int(pool_bytes) if pool_bytes else None,
                        enable_prefix_caching=common.parameter(config, "enable_prefix_caching", "true") == "true",
                        # resident from the start: flat memory under load, a pool too big fails here
                        prefault_kv_cache=common.parameter(config, "kv_cache_prefault", "true") == "true")
        pb_utils.Logger.log_info(
            f"{args['model_name']}: KV cache of {engine.blocks.usable_blocks} blocks of {engine.blocks.block_size} "
            f"tokens ({engine.pool.nbytes / 2**20:.0f} MiB), prefix caching "
            f"{'on' if engine.blocks.enable_prefix_caching else 'off'}, {engine.max_slots} decode slots")
        disaggregated = common.parameter(config, "shape") == "disaggregated"
        if not disaggregated:  # else prompts come computed: this model's prefill graphs compile at first use
            warm_up_prefill(engine)
        warm_up(engine)
        # execute() and the decode loop both update the gauges and counters: one thread at a time. tritonserver
        # 2.51's stub is not safe for two threads updating one Metric: increment() and observe() let go of the GIL
        # and then replace the metric's shared-memory message, freeing the one the other thread has just sent and
        # the server has not read yet. The server then read freed memory (and freed it again): it died of SIGSEGV
        # in ProcessMetricRequest within seconds of a burst of short requests (tests/test_server.py), or the
        # corrupted region lost responses and a stream never ended.
        self.metrics_lock = threading.Lock()
        self.metrics: DecodeMetrics | None = DecodeMetrics(pb_utils, model=args["model_name"])
        self.scheduler = Scheduler(engine, max_waiting=int(common.parameter(config, "max_waiting", "64")),
                                   on_step=self.on_step, on_state=self.on_queue,
                                   prefill_budget=int(common.parameter(config, "prefill_budget",
                                                                       str(DEFAULT_PREFILL_BUDGET))),
                                   speculation=Speculation.from_parameters(
                                       lambda key, default: common.parameter(config, key, default)))
        if self.scheduler.speculation:
            pb_utils.Logger.log_info(f"{args['model_name']}: speculative decoding by n-gram lookup: "
                                     f"{self.scheduler.speculation}")
        # grammars (structured_outputs) compile on a thread of their own, over the tokenizer model's vocabulary
        self.grammars = GrammarCompiler.for_tokenizer_model(
            common.version_dir(args).parent.parent / model_name(args["model_name"].removesuffix("_decode"),
                                                                "tokenizer"))
        # the disaggregated shape: prompts computed by NAME_prefill arrive as leases on its shared pool
        self.region = RegionOpener(region_path(args["model_name"].removesuffix("_decode"))) if disaggregated else None
        common.freeze_loaded_objects()
        self.scheduler.start()
        self.on_queue(self.scheduler)  # the pool's gauges from the start, before any request (gateway_metrics.py)
        self.name = args["model_name"]
        self.stream_interval = int(common.parameter(config, "stream_interval", "1"))
        grace = float(common.parameter(config, "shutdown_grace_seconds", "20"))
        self.watch = ShutdownWatch(
            probe=self.server_accepts_requests, busy=lambda: bool(self.scheduler.running or self.scheduler.waiting),
            on_stopping=lambda: self.scheduler.drain(grace, f"the server is shutting down: generation stopped "
                                                            f"{grace:g} s after it began to (shutdown_grace_seconds)"),
        ).start()

    def on_queue(self, scheduler: Scheduler) -> None:
        with self.metrics_lock:
            if self.metrics is not None:
                self.metrics.on_queue(scheduler)

    def on_step(self, scheduler: Scheduler, batch: int, seconds: float) -> None:
        with self.metrics_lock:
            if self.metrics is not None:
                self.metrics.on_step(scheduler, batch, seconds)

    def server_accepts_requests(self) -> bool:
        """Whether tritonserver still accepts requests: a stop request for no sequence, sent to this model."""
        probe = pb_utils.InferenceRequest(model_name=self.name, requested_output_names=["step_ints"],
                                          inputs=[common.bytes_tensor("stop_key", [""])])
        try:
            iterator = probe.exec(decoupled=True)
            responses = list(iterator)
        except pb_utils.TritonModelException as exc:
            pb_utils.Logger.log_info(f"{self.name}: the shutdown probe was refused ({exc}); draining")
            return False
        common.FINISHED_STREAMS.hold(iterator)  # dropped by a later is_cancelled() (serving/finished_streams.py)
        errors = [r.error().message() for r in responses if r.has_error()]
        if errors:
            pb_utils.Logger.log_info(f"{self.name}: the shutdown probe was refused ({errors[0]}); draining")
        return not errors

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            stop_key = common.get(request, "stop_key")
            if stop_key is not None:
                found = self.scheduler.cancel(common.text(request, "stop_key"))
                sender.send(pb_utils.InferenceResponse(output_tensors=common.step_tensors(  # is_final: found
                    num_input_tokens=0, num_output_tokens=0, final=found, logprobs=[], cum_logprob=0.0,
                    finish_reason="")), flags=FINAL)
                continue
            handover = decode_handover(self.region.get() if self.region else None, common.get(request, "kv_handover"))
            try:
                self.scheduler.submit(self.decode_request(request, sender, handover))
            except Exception as exc:  # noqa: BLE001 - ServerBusy, a refusal, or a malformed step input
                if handover is not None:
                    handover.give_back()
                sender.send(error_as_data(str(exc)), flags=FINAL)
            self.on_queue(self.scheduler)
        return None

    def decode_request(self, request, sender, handover: Handover | None = None) -> DecodeRequest:
        fields = common.json_input(request, "params_json")
        if common.REFUSAL in fields:  # refused by the tokenizer step: answered as data by execute()
            raise common.StepRefused(fields[common.REFUSAL])
        words = common.json_input(request, "word_ids")
        prompt_ids = common.get(request, "input_ids").reshape(-1).tolist()
        prompt_tail = stream_window(prompt_ids)
        params = GenerationParams(**fields)
        # A client that does not stream (KServe /infer, /generate) gets one text at the end: its tokens travel
        # to the front model in as few responses as the interval's bound allows.
        interval = params.stream_interval or (self.stream_interval if params.stream else MAX_STREAM_INTERVAL)
        pending: list[float] = []  # log-probabilities of the tokens generated and not yet sent
        pending_tops: list[list[tuple[int, float]]] = []  # and their alternatives, when asked for

        # Through the ensemble is_cancelled() never answers true (tritonserver 2.51 does not pass a cancellation
        # into ensemble steps; the front model stops the sequence instead): only a direct client relies on it.
        # Its round trips also let the finished shutdown probes go (serving/finished_streams.py).
        cancelled = CancelPoll(common.is_cancelled_releasing(sender.is_cancelled))
        closed = False  # its final response is sent

        def emit(event: TokenEvent) -> None:
            nonlocal closed
            if closed:
                # Nothing more for a request that has ended (the loop ends every request after a failed step, this
                # one too if its release failed): asking is_cancelled() of a finished request made tritonserver
                # 2.51 read its freed response factory (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled).
                return
            if cancelled():  # end its stream, free the slot
                closed = True
                sender.send(common.failed_response("request cancelled", pb_utils.TritonError.CANCELLED), flags=FINAL)
                if not event.finish_reason:
                    raise ClientGone()  # the loop frees its slot now; a final event ends it anyway
                return
            if event.error:
                closed = True
                sender.send(error_as_data(event.error, event.num_input_tokens), flags=FINAL)
                return
            if event.token >= 0:
                pending.append(event.logprob)
                if params.top_logprobs:
                    pending_tops.append(event.top)
                # the first token goes at once (time to first token); later ones every `interval` tokens
                if not event.finish_reason and len(event.output_ids) > 1 and len(pending) < interval:
                    return
            closed = bool(event.finish_reason)
            sender.send(event_response(event, prompt_tail, pending, pending_tops), flags=FINAL if closed else 0)
            pending.clear()
            pending_tops.clear()

        # checked by the tokenizer step: compiled here against the vocabulary, off the decode loop
        grammar = self.grammars.submit(grammar_of(json.loads(params.structured_outputs))) \
            if params.structured_outputs else None
        return DecodeRequest(
            key=common.text(request, "request_key"),
            prompt_ids=prompt_ids,
            params=params,
            emit=emit, end_ids=tuple(words["end_ids"]), stop_words=words["stop"], bad_words=words["bad"],
            grammar=grammar, handover=handover,
            first=FirstToken.from_tensors(
                common.text(request, "first_json") if common.get(request, "first_json") is not None else None,
                common.get(request, "first_logits")) if handover is not None else None)

    def finalize(self):
        exit_watchdog(self.name)  # first: finalize() itself may be what never ends
        self.watch.close()
        self.grammars.close()
        self.scheduler.shutdown("the server is shutting down; generation stopped")
        common.drop_metrics(self)

