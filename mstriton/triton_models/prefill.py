"""NAME_prefill: the prompts of a dynamic batch as one padded MindIR prefill; each gets its last-position
logits and its KV cache."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ..engine.engine import prefill_each, warm_up_prefill
from ..engine.graphs import EngineGraphs
from . import common


class TritonPythonModel:
    def initialize(self, args):
        config = common.model_config(args)
        self.graphs = EngineGraphs(common.version_dir(args) / common.parameter(config, "engine", "engine"),
                                   device=common.parameter(config, "device"),
                                   device_id=int(common.parameter(config, "device_id", "0")))
        warm_up_prefill(self.graphs)  # compile now, so the first requests are not the slow ones

    def execute(self, requests):
        prompts = [common.get(r, "input_ids").reshape(-1) for r in requests]
        try:
            results = prefill_each(self.graphs, prompts)
        except Exception as exc:  # noqa: BLE001
            return [common.error_response(exc) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("logits", logits[None]),
            pb_utils.Tensor("kv_keys", np.stack([k[:, :, :len(prompt)] for k in keys])[None]),
            pb_utils.Tensor("kv_values", np.stack([v[:, :len(prompt)] for v in values])[None]),
        ]) for prompt, (logits, keys, values) in zip(prompts, results)]
