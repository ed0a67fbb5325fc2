"""NAME_prefill (disaggregated shape): prompts of the requests Triton's dynamic batcher merged, prefilled in one
engine call into a KV block pool in shared memory, with its own prefix cache; each prompt's blocks are leased to
the decode model (engine/shared_kv.py, serving/prefill_stage.py). Outputs per request: the handover and the last
token's logits (for NAME_sampler). A request refused upstream, or one this model cannot take, gets an empty
handover and the decode model computes its prompt itself."""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from ..engine.engine import Engine, pool_blocks, warm_up_prefill
from ..engine.graphs import EngineGraphs
from ..engine.shared_kv import SharedKV, region_path
from ..kernels import activations
from ..repository import read_config
from ..serving.metrics import PrefillMetrics
from ..serving.prefill_stage import PrefillStage
from ..serving.shutdown import stacks_on_request
from . import common

REAP_SECONDS = 0.5  # how often returned leases free their blocks when no request comes to do it


class TritonPythonModel:
    def initialize(self, args):
        stacks_on_request()  # kill -USR1: every thread's stack in the log
        config = common.model_config(args)
        name = args["model_name"]
        engine_dir = common.version_dir(args) / common.parameter(config, "engine")
        # the decode model's engine, run with the decode model's kernel settings: one place to change them
        decode_config = read_config(engine_dir.parent.parent)
        mode, source = activations.apply_configured(decode_config.parameters["kernel_activations"].string_value
                                                    if "kernel_activations" in decode_config.parameters else None)
        graphs = EngineGraphs(engine_dir,
                              device=common.parameter(config, "device"),
                              device_id=int(common.parameter(config, "device_id", "0")))
        pool_bytes = common.parameter(config, "kv_cache_bytes", "")
        num_blocks = pool_blocks(graphs, int(pool_bytes) if pool_bytes else None, graphs.max_batch_size)
        self.region = SharedKV.for_graphs(region_path(common.parameter(config, "llm_name")), graphs, num_blocks,
                                          prefault=common.parameter(config, "kv_cache_prefault", "true") == "true")
        engine = Engine(graphs, enable_prefix_caching=common.parameter(config, "enable_prefix_caching",
                                                                       "true") == "true", pool=self.region.pool)
        pb_utils.Logger.log_info(
            f"{name}: {mode} activations ({source}); shared KV pool {self.region.path} of "
            f"{engine.blocks.usable_blocks} blocks of {engine.blocks.block_size} tokens "
            f"({self.region.pool.nbytes / 2**20:.0f} MiB), prefix caching "
            f"{'on' if engine.blocks.enable_prefix_caching else 'off'}")
        warm_up_prefill(engine)
        self.stage = PrefillStage(engine, self.region)
        self.metrics_lock = threading.Lock()  # finalize() lets go of the metrics (common.drop_metrics)
        self.metrics: PrefillMetrics | None = PrefillMetrics(pb_utils, model=name)
        self.stopped = threading.Event()
        self.reaper = threading.Thread(target=self.reap, name="mstriton-prefill-reaper", daemon=True)
        common.freeze_loaded_objects()
        self.reaper.start()

    def reap(self) -> None:
        """Free the blocks of returned leases and keep the gauges current, while no request comes."""
        while not self.stopped.wait(REAP_SECONDS):
            self.stage.reap()
            with self.metrics_lock:
                if self.metrics is not None:
                    self.metrics.update(self.stage.stats())

    def execute(self, requests):
        prompts = []
        for request in requests:
            try:
                refused = common.REFUSAL in common.json_input(request, "params_json")
                prompts.append(None if refused else common.get(request, "input_ids").reshape(-1).tolist())
            except Exception:  # noqa: BLE001 - malformed: decode answers it
                prompts.append(None)
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("kv_handover", result.handover[None]),
            pb_utils.Tensor("logits", result.logits[None])]) for result in self.stage.run(prompts)]

    def finalize(self):
        self.stopped.set()
        self.reaper.join()
        common.drop_metrics(self)
        # the decode model keeps its mapping while it drains; the name goes now (the supervisor removes it after a
        # killed server)
        self.region.unlink()
