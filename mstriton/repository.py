"""The Triton model-repository layout of one served LLM, and its ``config.pbtxt`` files.

Configs are built as ``ModelConfig`` protobuf messages (Triton's own schema, shipped in tritonclient) and
written with ``text_format``, never by string templates: a misspelt field fails here, not at server start.

Layout for a model called NAME (every Python model's 1/model.py re-exports its adapter from the package):
    NAME/              the front model clients call (decoupled): validation, streaming, cancellation,
                       detokenization; 1/ the tokenizer files
    NAME_unary/        one response per request, for KServe v2 /infer and /generate
    NAME_pipeline/     the ensemble: tokenizer -> prefill -> sampler -> decode (token ids out); in the colocated
                       shape tokenizer -> decode
    NAME_tokenizer/    1/ the tokenizer files (tokenizer.model, or tokenizer.json), tokenizer_config.json, and
                       chat_template.jinja when the model has a chat template
    NAME_prefill/      prompts of many requests in one prefill call (dynamic batcher), into a KV block pool in
                       shared memory with its own prefix cache; hands each prompt's blocks to decode by lease
                       (engine/shared_kv.py). It runs the decode model's engine folder.
    NAME_sampler/      each prompt's first token, with the request's own settings (dynamic batcher)
    NAME_decode/       the generation engine (decoupled): paged KV cache, continuous decode; it adopts the handed-over
                       prompts and computes the others itself (the colocated shape: every prompt, in chunks between
                       decode steps); 1/engine/{manifest.json, weights.ckpt, prefill.mindir, prefill_chunk.mindir,
                       decode_b*_s*.mindir}
(tokenizer files are each one file on disk, hard-linked where they appear twice).

And for each method METHOD registered at conversion (serving/methods.py):
    NAME_METHOD/       the front model with the method's pre- and postprocessing: 1/method.py (the user's file),
                       the tokenizer files
    NAME_METHOD_unary/ one response per request, through NAME_METHOD
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from .params import DEFAULT_PREFILL_BUDGET, PARAMETERS
from .serving.methods import (FIELDS_INPUT as METHOD_FIELDS_INPUT, OUTPUT as METHOD_OUTPUT, MethodFileError,
                              load_method)
from .serving.speculation import Speculation

VERSION = "1"
COMPONENTS = ("", "unary", "pipeline", "tokenizer", "prefill", "sampler", "decode")
# Components earlier versions wrote: a re-conversion removes them too. (The detokenizer step moved into the
# front model: a step after decode inside the ensemble kept tritonserver 2.51 from exiting on SIGTERM.)
RETIRED_COMPONENTS = ("detokenizer",)
# The two shapes of the pipeline: prefill and first-token sampling in models of their own under the dynamic batcher,
# the KV handed to decode in shared memory (disaggregated), or both inside the decode model between its steps
# (colocated). benchmarks/shapes.md measures which serves better where.
SHAPES = ("disaggregated", "colocated")


def check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"--shape must be one of {list(SHAPES)}, got {shape!r}")


def model_name(name: str, component: str) -> str:
    return f"{name}_{component}" if component else name


def owned_model_dirs(repository: Path, name: str) -> list[Path]:
    """The folders of `repository` that belong to the LLM `name` (what a re-conversion replaces): its components,
    and its methods' folders."""
    if not repository.exists():
        return []
    candidates = {model_name(name, c) for c in COMPONENTS + RETIRED_COMPONENTS}
    return sorted(p for p in repository.iterdir() if p.is_dir() and (
        p.name in candidates or (p.name.startswith(f"{name}_") and (method_of(p) or ("",))[0] == name)))


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


# The client-facing inputs: every parameter of params.PARAMETERS (tensorrtllm_backend's names, their older
# spellings, MindSpore Serving's and TGI's) under each of its names, all optional but text_input (or messages: the
# front model checks). Defaults and ranges are GenerationParams'. NAME_unary takes them all but `stop`.
CLIENT_INPUTS = [(name, pb.DataType.Value(p.triton_type), p.dims) for p in PARAMETERS for name in p.input_names]
UNARY_INPUTS = [(name, pb.DataType.Value(p.triton_type), p.dims) for p in PARAMETERS if p.unary
                for name in p.input_names]
CLIENT_OUTPUTS = [
    ("text_output", pb.TYPE_STRING, [-1]), ("output_log_probs", pb.TYPE_FP32, [-1]),
    ("cum_log_probs", pb.TYPE_FP32, [1]), ("finish_reason", pb.TYPE_STRING, [1]),
    ("num_input_tokens", pb.TYPE_INT32, [1]), ("num_output_tokens", pb.TYPE_INT32, [1]),
    # with return_tokens: each new token's id, text, logprob, special flag and alternatives, as JSON
    ("tokens_json", pb.TYPE_STRING, [1]),
]
# The decode model's outputs are the pipeline's.
STEP_OUTPUTS = [
    # step_ints and step_floats: the fields named in triton_models/common.py (STEP_INTS, STEP_FLOATS)
    ("output_ids", pb.TYPE_INT32, [-1]), ("step_ints", pb.TYPE_INT32, [-1]), ("step_floats", pb.TYPE_FP32, [-1]),
    ("finish_reason", pb.TYPE_STRING, [1]),
]


def add_tensors(message, specs, optional: bool = False) -> None:
    for name, dtype, dims in specs:
        tensor(message, name, dtype, dims, optional=optional)


def model_configs(name: str, *, max_batch_size: int, device: str, device_id: int, engine_params: dict,
                  kernel_activations: str = "float32", speculative: str = "off",
                  shape: str = "disaggregated") -> dict:
    """Every model of the LLM `name`: component -> ModelConfig ("" is the front model NAME itself).
    `engine_params` (tokenizer, max_seq_len, vocab_size, end_ids, template) go to the tokenizer; its
    `tokenizer` (the file the tokenizer loads: tokenizer.model or tokenizer.json) to the front model too.
    `shape`: one of SHAPES."""
    check_shape(shape)
    dev = {"device": device, "device_id": str(device_id)}
    configs = {}

    front = python_model(name, max_batch_size=max_batch_size, decoupled=True,
                         parameters={"llm_name": name, "tokenizer": engine_params["tokenizer"]})
    add_tensors(front.input, CLIENT_INPUTS, optional=True)  # text_input or messages: the front model checks
    add_tensors(front.output, CLIENT_OUTPUTS)
    configs[""] = front

    unary = python_model(model_name(name, "unary"), max_batch_size=max_batch_size, dynamic_batching=True,
                         parameters={"llm_name": name})
    add_tensors(unary.input, UNARY_INPUTS, optional=True)
    add_tensors(unary.output, CLIENT_OUTPUTS)
    configs["unary"] = unary

    request_in = [("text_input", pb.TYPE_STRING, [1]), ("params_json", pb.TYPE_STRING, [1]),
                  ("request_key", pb.TYPE_STRING, [1])]
    tokenizer = python_model(model_name(name, "tokenizer"), max_batch_size=max_batch_size, dynamic_batching=True,
                             parameters=engine_params)
    add_tensors(tokenizer.input, request_in[:2])
    add_tensors(tokenizer.output, [("input_ids", pb.TYPE_INT32, [-1]), ("params_json", pb.TYPE_STRING, [1]),
                                   ("word_ids", pb.TYPE_STRING, [1])])
    configs["tokenizer"] = tokenizer

    decode = python_model(model_name(name, "decode"), max_batch_size=max_batch_size, decoupled=True,
                          device=device, parameters={
                              "engine": "engine", "max_waiting": "64",
                              # below tritonserver's default --exit-timeout-secs (30): see scheduler.drain
                              "shutdown_grace_seconds": "20", "stream_interval": "1",
                              # the paged KV cache: its size in bytes (empty: a share of the machine's memory,
                              # engine/kv_pool.py), prompt tokens prefilled per step beside running streams
                              "kv_cache_bytes": "", "enable_prefix_caching": "true",
                              "prefill_budget": str(DEFAULT_PREFILL_BUDGET),
                              # float32 or int8 activations of the CPU kernels' products (kernels/activations.py);
                              # MSTRITON_KERNEL_ACTIVATIONS in the server's environment overrides it
                              "kernel_activations": kernel_activations,
                              # speculative decoding (off, or ngram: drafts by n-gram lookup, serving/scheduler.py)
                              **Speculation.PARAMETERS, "speculative": speculative, **dev})
    add_tensors(decode.input, [("input_ids", pb.TYPE_INT32, [-1]),
        ("params_json", pb.TYPE_STRING, [1]), ("word_ids", pb.TYPE_STRING, [1]),
        ("request_key", pb.TYPE_STRING, [1])], optional=True)
    add_tensors(decode.input, [("stop_key", pb.TYPE_STRING, [1])], optional=True)
    add_tensors(decode.output, STEP_OUTPUTS)
    configs["decode"] = decode

    if shape == "disaggregated":
        decode.parameters["shape"].string_value = shape
        add_tensors(decode.input, HANDOVER_TENSORS, optional=True)
        prefill = python_model(model_name(name, "prefill"), max_batch_size=max_batch_size, dynamic_batching=True,
                               device=device, parameters={
                                   "llm_name": name,
                                   # the decode model's engine folder, from this model's version folder
                                   "engine": f"../../{model_name(name, 'decode')}/{VERSION}/engine",
                                   "kv_cache_bytes": "", "enable_prefix_caching": "true",
                                   "kv_cache_prefault": "true", **dev})
        add_tensors(prefill.input, [("input_ids", pb.TYPE_INT32, [-1]), ("params_json", pb.TYPE_STRING, [1])])
        add_tensors(prefill.output, [("kv_handover", pb.TYPE_INT32, [-1]), ("logits", pb.TYPE_FP32, [-1])])
        ragged(prefill, "input_ids")
        # A request's answer waits for its whole batch: batches of what one prefill graph call takes (the engine's
        # PREFILL_SCORE_BUDGET holds 8 prompts of 128 tokens), not of every queued prompt, so that under a burst the
        # first prompts reach the decode model while later ones are computed.
        prefill.dynamic_batching.preferred_batch_size.append(min(PREFILL_BATCH, max_batch_size))
        configs["prefill"] = prefill
        sampler = python_model(model_name(name, "sampler"), max_batch_size=max_batch_size, dynamic_batching=True,
                               parameters={"llm_name": name})
        add_tensors(sampler.input, [("logits", pb.TYPE_FP32, [-1]), ("params_json", pb.TYPE_STRING, [1]),
                                    ("word_ids", pb.TYPE_STRING, [1]), ("input_ids", pb.TYPE_INT32, [-1])])
        add_tensors(sampler.output, HANDOVER_TENSORS[1:])
        ragged(sampler, "input_ids", "logits")
        configs["sampler"] = sampler

    configs["pipeline"] = pipeline_ensemble(name, max_batch_size, request_in, shape)
    return configs


PREFILL_BATCH = 8


def ragged(config: pb.ModelConfig, *names: str) -> None:
    """Let the dynamic batcher merge requests whose `names` inputs differ in length (prompts do; an empty logits row
    too): without it, it merges only requests of equal shapes. The Python backend hands each request over as it
    came, so nothing is padded."""
    for t in config.input:
        if t.name in names:
            t.allow_ragged_batch = True


# What the prefill and sampler models hand the decode model: the lease on the prompt's blocks in the shared pool
# (engine/shared_kv.py), the first token (serving/first_token.py), and for a grammar's request the logits it is
# chosen from.
HANDOVER_TENSORS = [("kv_handover", pb.TYPE_INT32, [-1]), ("first_json", pb.TYPE_STRING, [1]),
                    ("first_logits", pb.TYPE_FP32, [-1])]


def pipeline_ensemble(name: str, max_batch_size: int, request_in, shape: str = "disaggregated") -> pb.ModelConfig:
    """tokenizer -> prefill -> sampler -> decode (decoupled), or tokenizer -> decode (colocated), as a Triton
    ensemble.

    Decode is the last step on purpose: its token responses leave the ensemble without another internal
    request. On SIGTERM tritonserver 2.51 stops every model's scheduler at once; an ensemble whose next step is
    refused then never completes, and the server waits out its exit timeout and is killed."""
    config = pb.ModelConfig(name=model_name(name, "pipeline"), platform="ensemble", max_batch_size=max_batch_size)
    add_tensors(config.input, request_in)
    add_tensors(config.output, STEP_OUTPUTS)

    def step(component: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
        s = config.ensemble_scheduling.step.add()
        s.model_name, s.model_version = model_name(name, component), -1
        for model_input, tensor_name in inputs.items():
            s.input_map[model_input] = tensor_name
        for model_output, tensor_name in outputs.items():
            s.output_map[model_output] = tensor_name

    step("tokenizer", {"text_input": "text_input", "params_json": "params_json"},
         {"input_ids": "_ids", "params_json": "_params", "word_ids": "_words"})
    handover = {}
    if shape == "disaggregated":
        step("prefill", {"input_ids": "_ids", "params_json": "_params"},
             {"kv_handover": "_handover", "logits": "_logits"})
        step("sampler", {"logits": "_logits", "params_json": "_params", "word_ids": "_words", "input_ids": "_ids"},
             {"first_json": "_first", "first_logits": "_first_logits"})
        handover = {"kv_handover": "_handover", "first_json": "_first", "first_logits": "_first_logits"}
    step("decode", {"input_ids": "_ids", "params_json": "_params", "word_ids": "_words",
                    "request_key": "request_key", **handover},
         {o[0]: o[0] for o in STEP_OUTPUTS})
    return config


def model_py(component: str) -> str:
    """The model.py of a Python model: a re-export of the adapter class in the package."""
    module = component or "front"
    return (f'"""Triton Python-backend entry point; the adapter lives in the mstriton package."""\n\n'
            f"from mstriton.triton_models.{module} import TritonPythonModel  # noqa: F401\n")


def write_config(model_dir: Path, config: pb.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def read_config(model_dir: Path) -> pb.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())


# ---- methods (serving/methods.py): NAME_METHOD and NAME_METHOD_unary ----------------------------------------------

# A method's front model takes the client's own fields (a JSON object) beside CLIENT_INPUTS, and gives back
# postprocess's dict (a JSON object) beside CLIENT_OUTPUTS (serving/methods.py: FIELDS_INPUT, OUTPUT).
METHOD_INPUTS = [(METHOD_FIELDS_INPUT, pb.TYPE_STRING, [1])]
METHOD_OUTPUTS = [(METHOD_OUTPUT, pb.TYPE_STRING, [1])]


def method_configs(name: str, method: str, configs: dict) -> dict[str, tuple[str, pb.ModelConfig]]:
    """The models of the method `method` of the LLM `name`, made from its front and unary models in `configs`
    (model_configs' result): model name -> (the component whose adapter it runs, its config).
    NAME_METHOD is the front model with the parameter `method`; NAME_METHOD_unary the unary model calling it
    (`front_model`), with `method_of` naming the method."""
    front, unary = pb.ModelConfig(), pb.ModelConfig()
    front.CopyFrom(configs[""])
    unary.CopyFrom(configs["unary"])
    front.name = model_name(name, method)
    unary.name = model_name(name, f"{method}_unary")
    front.parameters["method"].string_value = method
    unary.parameters["front_model"].string_value = front.name
    unary.parameters["method_of"].string_value = method
    for config in (front, unary):
        add_tensors(config.input, METHOD_INPUTS, optional=True)
        add_tensors(config.output, METHOD_OUTPUTS)
    return {front.name: ("", front), unary.name: ("unary", unary)}


def method_of(model_dir: Path) -> tuple[str, str] | None:
    """(the LLM, the method) whose folder `model_dir` is (NAME_METHOD or NAME_METHOD_unary), or None."""
    try:
        parameters = read_config(model_dir).parameters
    except (OSError, text_format.ParseError):
        return None
    llm = parameters["llm_name"].string_value if "llm_name" in parameters else ""
    for key in ("method", "method_of"):
        if key in parameters and llm:
            return llm, parameters[key].string_value
    return None


def checked_methods(methods: dict[str, str | Path] | None, name: str, repository: Path) -> dict[str, bytes]:
    """At conversion, the methods to serve (`--method METHOD=FILE`: METHOD -> FILE), each loaded as its front model
    will load it (importable, with preprocess and postprocess taking their arguments): METHOD -> the file's bytes.
    Errors name the flag. The folders NAME_METHOD and NAME_METHOD_unary must be free in `repository`, or the LLM's
    own; and no folder a conversion of `name` replaces may be another LLM's method."""
    files = {}
    owned = set(owned_model_dirs(repository, name))
    for method, path in (methods or {}).items():
        flag = f"--method {method}={path}"
        try:
            load_method(path, method)
        except MethodFileError as exc:
            raise MethodFileError(f"{flag}: {exc}") from None
        for folder in (repository / model_name(name, method), repository / model_name(name, f"{method}_unary")):
            if folder.exists() and folder not in owned:
                raise ValueError(f"{flag}: the repository already has a model {folder.name} that is not one of "
                                 f"{name}'s: name the method otherwise")
        files[method] = Path(path).read_bytes()
    for folder in sorted(owned):  # converting `a_b` must not take the folders of the LLM a's method b
        if (owner := method_of(folder)) is not None and owner[0] != name:
            raise ValueError(f"{folder.name} in {repository} is the method {owner[1]} of the LLM {owner[0]}: "
                             f"name this model otherwise, or convert {owner[0]} without that method first")
    return files
