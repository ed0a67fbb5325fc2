"""Checkpoint -> MindIR engines and Triton model folders, replaced atomically.

Everything is built in a staging folder inside the repository; only when the whole model is built do its
folders move into place (a rename each), replacing any previous conversion of the same name. A failed or
interrupted run leaves the repository as it was, apart from a hidden staging folder, which the next conversion
of that name removes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from .engine.buckets import DEFAULT_PREFILL_CHUNK
from .engine.graphs import DEVICES, DTYPES, export_engine
from .engine.weight_formats import check_weights
from .kernels.activations import MODES as ACTIVATION_MODES, served_default
from .repository import VERSION, check_shape, model_configs, model_name, model_py, owned_model_dirs, write_config
from .sources import TEMPLATE_CHOICES, read_source
from .tokenizer.chat import tool_format_of
from .tokenizer.hf_tokenizer import CHAT_TEMPLATE_FILE
# methods (docs/methods.md): checked before anything is converted; two models each, the file in the first
from .repository import checked_methods, method_configs
from .serving.methods import METHOD_FILE

STAGING_PREFIX = ".staging-"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _swap_in(models: Path, repository: Path, name: str, trash: Path) -> list[Path]:
    """Replace the repository's folders of `name` by those built in `models`: renames only, undone on failure."""
    trash.mkdir()
    previous = owned_model_dirs(repository, name)
    moved_out, moved_in = [], []
    try:
        for folder in previous:
            folder.rename(trash / folder.name)
            moved_out.append(folder)
        for folder in sorted(models.iterdir()):
            folder.rename(repository / folder.name)
            moved_in.append(repository / folder.name)
    except OSError:
        for folder in moved_in:
            shutil.rmtree(folder, ignore_errors=True)
        for folder in moved_out:
            (trash / folder.name).rename(folder)
        raise
    return moved_in


def convert(checkpoint: str | Path, name: str, repository: str | Path, *, methods: dict[str, str | Path] | None = None,
            device: str = "CPU", device_id: int = 0,
            max_batch_size: int = 16, max_seq_len: int | None = None, dtype: str = "float32",
            template: str = "none", prefill_chunk: int = DEFAULT_PREFILL_CHUNK, weights: str = "float32",
            activations: str | None = None, speculative: str = "off", shape: str = "disaggregated",
            progress: Callable[[str], None] = print) -> list[Path]:
    """Convert `checkpoint` into `repository` as the models NAME_*. Returns the model folders written.
    `activations`: what the served model's kernel products use (float32 or int8; None: served_default(weights)).
    `methods`: METHOD -> a Python file with preprocess and postprocess (serving/methods.py), each served as
    NAME_METHOD and NAME_METHOD_unary."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--name must be letters, digits, '_' or '-', got {name!r}")
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if template not in TEMPLATE_CHOICES and not str(template).endswith(".jinja"):
        raise ValueError(f"--template must be one of {list(TEMPLATE_CHOICES)} or a .jinja file, got {template!r}")
    check_weights(weights)
    if activations is not None and activations not in ACTIVATION_MODES:
        raise ValueError(f"--activations must be one of {list(ACTIVATION_MODES)}, got {activations!r}")
    activations = activations or served_default(weights)
    if speculative not in ("off", "ngram"):
        raise ValueError(f"--speculative must be 'off' or 'ngram', got {speculative!r}")
    if speculative != "off" and weights == "float32":
        raise ValueError("--speculative ngram needs the CPU kernels' decode steps: give --weights one of bfloat16, "
                         "int8, Q8_0, Q4_0, Q4_1 (float32 weights decode with MindSpore's ops, which cannot verify "
                         "drafted tokens)")
    check_shape(shape)  # before the long work, as every argument
    checkpoint, repository = Path(checkpoint), Path(repository)
    method_files = checked_methods(methods, name, repository)  # before the long work: a wrong file fails at once
    started = time.monotonic()
    progress(f"reading checkpoint {checkpoint}")
    source = read_source(checkpoint, template, progress=progress)
    config = source.config
    max_seq_len = max_seq_len or config.max_position_embeddings

    repository.mkdir(parents=True, exist_ok=True)
    for stale in repository.glob(f"{STAGING_PREFIX}{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = repository / f"{STAGING_PREFIX}{name}-{os.getpid()}"
    try:
        engine = staging / "engine"
        export_engine(config, source.weights, engine, dtype=dtype, device=device, max_batch_size=max_batch_size,
                      max_seq_len=max_seq_len, prefill_chunk=prefill_chunk, weights_format=weights,
                      blocks=source.blocks, block_types=source.block_types,
                      interleave_blocks=activations == "int8", progress=progress)
        models = staging / "models"
        decode_dir = models / model_name(name, "decode") / VERSION
        decode_dir.mkdir(parents=True)
        engine.rename(decode_dir / "engine")  # the decode model runs every graph
        tokenizer_dir = models / model_name(name, "tokenizer") / VERSION
        front_dir = models / model_name(name, "") / VERSION  # the front model detokenizes
        for folder in (tokenizer_dir, front_dir):
            folder.mkdir(parents=True)
        for file_name, content in source.tokenizer_files.items():
            (tokenizer_dir / file_name).write_bytes(content)
            _link_or_copy(tokenizer_dir / file_name, front_dir / file_name)
        if source.chat_template is not None:
            (tokenizer_dir / CHAT_TEMPLATE_FILE).write_text(source.chat_template, encoding="utf-8")
        engine_params = {"tokenizer": source.tokenizer_entry, "max_seq_len": str(max_seq_len),
                         "vocab_size": str(config.vocab_size), "end_ids": ",".join(map(str, source.end_ids)),
                         "template": "none" if template == "none" else Path(template).stem,
                         "tool_format": tool_format_of(source.chat_template)}
        configs = model_configs(name, max_batch_size=max_batch_size, device=device, device_id=device_id,
                                engine_params=engine_params,
                                kernel_activations=activations, speculative=speculative, shape=shape)
        for component, model_config in configs.items():
            folder = models / model_name(name, component)
            write_config(folder, model_config)
            (folder / VERSION).mkdir(exist_ok=True)
            if model_config.backend == "python":
                (folder / VERSION / "model.py").write_text(model_py(component))
        for method, content in method_files.items():  # each method: a front model and a unary entry of its own
            for model, (component, model_config) in method_configs(name, method, configs).items():
                write_config(models / model, model_config)
                (models / model / VERSION).mkdir(exist_ok=True)
                (models / model / VERSION / "model.py").write_text(model_py(component))
            method_dir = models / model_name(name, method) / VERSION
            (method_dir / METHOD_FILE).write_bytes(content)  # the file as it was checked
            for file_name in source.tokenizer_files:  # its front model detokenizes
                _link_or_copy(front_dir / file_name, method_dir / file_name)

        progress("moving the new model folders into the repository")
        written = _swap_in(models, repository, name, staging / "replaced")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"converted {name} in {time.monotonic() - started:.0f}s: {', '.join(p.name for p in written)}")
    return written
