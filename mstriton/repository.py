"""The Triton model-repository layout of one served LLM, and its ``config.pbtxt`` files.

Configs are built as ``ModelConfig`` protobuf messages (Triton's own schema, shipped in tritonclient) and
written with ``text_format``, never by string templates: a misspelt field fails here, not at server start.

Layout for a model called NAME:
    NAME_tokenizer/  config.pbtxt, 1/tokenizer.model, 1/tokenizer_config.json
    NAME_prefill/    config.pbtxt, 1/engine/{manifest.json, weights.ckpt, prefill.mindir}
    NAME_decode/     config.pbtxt, 1/engine/{manifest.json, weights.ckpt, decode_b*_s*.mindir}
(weights.ckpt is one file on disk, hard-linked into both engines). The serving models (ensemble, sampler,
detokenizer, unary entry point) are added by the serving layer to this same layout.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

VERSION = "1"
COMPONENTS = ("tokenizer", "prefill", "decode")


def model_name(name: str, component: str) -> str:
    return f"{name}_{component}"


def owned_model_dirs(repository: Path, name: str) -> list[Path]:
    """The folders of `repository` that belong to the LLM `name` (what a re-conversion replaces)."""
    if not repository.exists():
        return []
    candidates = {name, f"{name}_unary"} | {model_name(name, c) for c in
                                            COMPONENTS + ("sampler", "detokenizer")}
    return sorted(p for p in repository.iterdir() if p.is_dir() and p.name in candidates)


def tensor(message, name: str, dtype: int, dims: list[int], optional: bool = False):
    t = message.add()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    if optional:
        t.optional = True
    return t


def python_model(name: str, *, max_batch_size: int, parameters: dict[str, str], instance_count: int = 1,
                 device: str = "CPU", decoupled: bool = False, dynamic_batching: bool = False) -> pb.ModelConfig:
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    group = config.instance_group.add()
    group.count = instance_count
    # The Python backend places MindSpore itself (from the `device` parameter); Triton only runs the process.
    group.kind = pb.ModelInstanceGroup.KIND_CPU if device == "CPU" else pb.ModelInstanceGroup.KIND_MODEL
    if decoupled:
        config.model_transaction_policy.decoupled = True
    if dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = 1000
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


def engine_configs(name: str, *, max_batch_size: int, device: str, device_id: int) -> dict[str, pb.ModelConfig]:
    """Configs of the tokenizer, prefill and decode models."""
    common = {"device": device, "device_id": str(device_id)}
    tokenizer = python_model(model_name(name, "tokenizer"), max_batch_size=max_batch_size, dynamic_batching=True,
                             parameters={"tokenizer": "tokenizer.model"})
    tensor(tokenizer.input, "text_input", pb.TYPE_STRING, [1])
    tensor(tokenizer.output, "input_ids", pb.TYPE_INT32, [-1])
    tensor(tokenizer.output, "input_lengths", pb.TYPE_INT32, [1])

    prefill = python_model(model_name(name, "prefill"), max_batch_size=max_batch_size, dynamic_batching=True,
                           device=device, parameters={"engine": "engine", **common})
    tensor(prefill.input, "input_ids", pb.TYPE_INT32, [-1])
    tensor(prefill.input, "input_lengths", pb.TYPE_INT32, [1])
    tensor(prefill.output, "logits", pb.TYPE_FP32, [-1])

    decode = python_model(model_name(name, "decode"), max_batch_size=0, decoupled=True, device=device,
                          parameters={"engine": "engine", **common})
    tensor(decode.input, "input_ids", pb.TYPE_INT32, [-1])
    tensor(decode.output, "output_ids", pb.TYPE_INT32, [-1])
    return {"tokenizer": tokenizer, "prefill": prefill, "decode": decode}


def write_config(model_dir: Path, config: pb.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def read_config(model_dir: Path) -> pb.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())
