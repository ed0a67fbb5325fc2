"""Export the prefill and decode graphs to MindIR, and load them back for serving.

An engine directory holds:
    manifest.json          the model config, dtype, device, limits and buckets, and the file of every graph
    weights.ckpt           the weights, in the network's layout, as a MindSpore checkpoint
    prefill.mindir         one prefill graph, dynamic in batch and prompt length
    prefill_chunk.mindir   the next chunk of a long prompt against the cache before it (when prompts may be
                           longer than the chunk)
    decode_b{B}_s{S}.mindir  one decode graph per static (batch, cache length) bucket
Graphs take the weights as inputs, so one copy in memory serves every graph.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ..config import LlamaConfig
from ..model.llama import LlamaDecode, LlamaPrefill, LlamaPrefillChunk, weight_names
from .buckets import DEFAULT_PREFILL_CHUNK, batch_buckets, chunk_cache_length, chunk_starts, prefill_shape, \
    seq_buckets
from ..kernels.ops import portable_mindir
from .memory import aligned_copy
from .weight_formats import check_weights, pack_engine_weights

MANIFEST = "manifest.json"
WEIGHTS = "weights.ckpt"
PREFILL = "prefill.mindir"
PREFILL_CHUNK = "prefill_chunk.mindir"
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
DEVICES = ("CPU", "Ascend", "GPU")


def decode_file(batch: int, seq: int) -> str:
    return f"decode_b{batch}_s{seq}.mindir"


def set_device(device: str, device_id: int = 0) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(device, device_id)


def _export(net: nn.Cell, inputs: list, path: Path) -> None:
    ms.export(net, *inputs, file_name=str(path.with_suffix("")), file_format="MINDIR")
    if not path.exists():  # MindSpore names the file itself; make sure it is where the manifest says
        raise RuntimeError(f"MindSpore did not write {path}")


def export_engine(config: LlamaConfig, weights: dict[str, np.ndarray], out_dir: Path, *, dtype: str,
                  device: str, max_batch_size: int, max_seq_len: int,
                  batches: list[int] | None = None, seqs: list[int] | None = None,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, weights_format: str = "float32",
                  blocks: dict[str, np.ndarray] | None = None, block_types: dict[str, str] | None = None,
                  progress: Callable[[str], None] = print) -> dict:
    """Write an engine directory. `weights` are in the network's layout (see ``model/weights.py``);
    `weights_format` is one of weight_formats.WEIGHT_CHOICES (`blocks`: a GGUF file's own, see there)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_weights(weights_format)
    if weights_format != "float32" and (device != "CPU" or dtype != "float32"):
        raise ValueError(f"--weights {weights_format} runs on the CPU kernels: it needs --device CPU and --dtype "
                         f"float32 (activations), got --device {device} --dtype {dtype}; on Ascend and GPU use "
                         f"--weights float32")
    if not 1 <= max_seq_len <= config.max_position_embeddings:
        raise ValueError(f"max_seq_len must be in [1, {config.max_position_embeddings}] (the model's "
                         f"max_position_embeddings), got {max_seq_len}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if prefill_chunk < 0:
        raise ValueError(f"prefill_chunk must be >= 0 (0: prefill whole prompts), got {prefill_chunk}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ms_dtype = DTYPES[dtype]
    names = weight_names(config)
    # a tied model's LM head is its embedding table: counted once
    n_parameters = sum(w.size for n, w in weights.items() if not (n == "lm_head" and config.tie_word_embeddings))
    stored, formats = pack_engine_weights(config, weights, weights_format, blocks, block_types, progress)
    aliases = {n: "lm_head" for n in ("embed_tokens",) if n not in stored}  # a tied, packed table: the LM head
    arrays = {n: stored[aliases.get(n, n)] for n in names}

    def spec(array: np.ndarray) -> Tensor:
        return Tensor(shape=array.shape, dtype=ms.uint8 if array.dtype == np.uint8 else ms_dtype)

    weight_specs = [spec(arrays[n]) for n in names]
    kept = [n for n in names if n not in aliases]
    progress(f"saving {len(kept)} weight tensors ({n_parameters / 1e6:.1f}M parameters, {weights_format}, "
             f"{sum(stored[n].nbytes for n in kept) / 1e6:.0f} MB)")
    ms.save_checkpoint([{"name": n, "data": Tensor(stored[n]) if stored[n].dtype == np.uint8 else
                         Tensor(stored[n]).astype(ms_dtype)} for n in kept], str(out_dir / WEIGHTS))
    network_args = {"formats": formats or None}

    progress("exporting the prefill graph")
    _export(LlamaPrefill(config, ms_dtype, max_seq_len, **network_args),
            [Tensor(shape=[None, None], dtype=ms.int32), Tensor(shape=[None], dtype=ms.int32)] + weight_specs,
            out_dir / PREFILL)
    chunk = None
    if 0 < prefill_chunk < max_seq_len - 1:  # some prompts can be longer than a chunk
        progress(f"exporting the chunked-prefill graph (prompts over {prefill_chunk} tokens)")
        layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        cache_specs = [Tensor(shape=[None, kv, hd, None], dtype=ms_dtype)] * layers
        cache_specs += [Tensor(shape=[None, kv, None, hd], dtype=ms_dtype)] * layers
        _export(LlamaPrefillChunk(config, ms_dtype, max_seq_len, **network_args),
                [Tensor(shape=[None, None], dtype=ms.int32)] + [Tensor(shape=[None], dtype=ms.int32)] * 2
                + cache_specs + weight_specs, out_dir / PREFILL_CHUNK)
        chunk = {"file": PREFILL_CHUNK, "length": prefill_chunk}

    # Benchmarks may ask for a subset of buckets; serving uses the full ladders.
    batches, seqs = batches or batch_buckets(max_batch_size), seqs or seq_buckets(max_seq_len)
    decode = LlamaDecode(config, ms_dtype, max_seq_len, **network_args)
    layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    decode_files = {}
    writes_cache = decode.writes_cache  # the decode graphs store the new K/V into the caches they are given
    total, started = len(batches) * len(seqs), time.monotonic()
    for b in batches:
        for s in seqs:
            inputs = [Tensor(shape=[b], dtype=ms.int32), Tensor(shape=[b], dtype=ms.int32)]
            inputs += [Tensor(shape=[b, kv, hd, s], dtype=ms_dtype)] * layers
            inputs += [Tensor(shape=[b, kv, s, hd], dtype=ms_dtype)] * layers
            _export(decode, inputs + weight_specs, out_dir / decode_file(b, s))
            decode_files[f"{b}x{s}"] = decode_file(b, s)
            done = len(decode_files)
            eta = (time.monotonic() - started) / done * (total - done)
            progress(f"exported decode graph {done}/{total} (batch {b}, cache {s}), about {eta:.0f}s left")

    manifest = {"format": 1, "config": config.to_hf_dict(), "dtype": dtype, "device": device,
                "max_batch_size": max_batch_size, "max_seq_len": max_seq_len,
                "batch_buckets": batches, "seq_buckets": seqs, "weights": WEIGHTS, "weight_names": names,
                "weights_format": weights_format, "weight_formats": formats, "weight_aliases": aliases,
                "decode_writes_cache": writes_cache,
                "prefill": PREFILL, "prefill_chunk": chunk, "decode": decode_files}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


class FairLock:
    """A lock that serves its waiters in arrival order. With threading.Lock a thread that releases the lock can
    take it straight back: the decode loop did so step after step, and a prefill waiting in another thread
    starved for seconds (16 long prompts waited 16 s for their first token in the benchmark's engine alone)."""

    def __init__(self):
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> "FairLock":
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


# MindSpore refuses to compile or run a graph while another thread runs one ("Nested execution during JIT
# execution"): in a process that prefills and decodes from two threads, graph calls take turns, in order.
# (Each Triton model is a process of its own with one calling thread, so there the lock is never contended.)
GRAPH_LOCK = FairLock()


class EngineGraphs:
    """An engine directory loaded for serving: weights in memory once, graphs compiled on first use."""

    def __init__(self, engine_dir: str | Path, device: str | None = None, device_id: int = 0):
        self.dir = Path(engine_dir)
        self.manifest = json.loads((self.dir / MANIFEST).read_text())
        self.config = LlamaConfig.from_hf_dict(self.manifest["config"])
        self.device = device or self.manifest["device"]
        set_device(self.device, device_id)
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.np_dtype = Tensor(np.zeros(1), self.dtype).asnumpy().dtype
        self.max_batch_size, self.max_seq_len = self.manifest["max_batch_size"], self.manifest["max_seq_len"]
        self.batch_buckets, self.seq_buckets = self.manifest["batch_buckets"], self.manifest["seq_buckets"]
        params = ms.load_checkpoint(str(self.dir / WEIGHTS))
        # absent in engines exported before packed formats: float32, no aliases
        self.weights_format = self.manifest.get("weights_format", "float32")
        aliases = self.manifest.get("weight_aliases", {})
        missing = [n for n in self.manifest["weight_names"] if aliases.get(n, n) not in params]
        if missing:
            raise ValueError(f"{self.dir / WEIGHTS} lacks weight tensors {missing[:5]}")
        loaded = {n: aligned_copy(params[n].asnumpy()) for n in params}
        del params
        # An alias is the same array (a tied, packed embedding table is the LM head): in memory once.
        self.weight_arrays = [loaded[aliases.get(n, n)] for n in self.manifest["weight_names"]]
        self.weights = [Tensor.from_numpy(a) for a in self.weight_arrays]
        if self.device != "CPU":  # keep weights resident on the accelerator instead of copying them per call
            self.weights = [w.move_to(self.device) for w in self.weights]
        self._graphs: dict[str, nn.GraphCell] = {}
        chunk = self.manifest.get("prefill_chunk")  # absent in engines exported before chunked prefill
        # prompts longer than this prefill in chunks (prefill_long); shorter ones as whole prompts (prefill)
        self.chunk_length = chunk["length"] if chunk else None

    def weight_bytes_per_step(self) -> int:
        """Bytes one decode step reads from the weights: everything but the embedding table (rows are gathered;
        a tied packed table is the LM head, which is read whole)."""
        names, aliases = self.manifest["weight_names"], self.manifest.get("weight_aliases", {})
        read = {id(a): a.nbytes for n, a in zip(names, self.weight_arrays) if n != "embed_tokens" or n in aliases}
        return sum(read.values())

    def _graph(self, file: str) -> nn.GraphCell:
        if file not in self._graphs:
            # Graphs calling the CPU kernels name the library by its path at export: point them at this one's.
            self._graphs[file] = nn.GraphCell(ms.load(portable_mindir(self.dir / file)))
        return self._graphs[file]

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray):
        """tokens [B, T] int32 right-padded; returns logits [B, V], keys [L][B, Hkv, D, T'], values
        [L][B, Hkv, T', D] as numpy arrays, where T' >= T is the length bucket the graph ran at (see buckets.py);
        positions past a prompt's length hold nothing the caller may use."""
        batch, length = tokens.shape
        padded_batch, padded_length = prefill_shape(batch, length, self.max_seq_len)
        padded_tokens = np.zeros((padded_batch, padded_length), np.int32)
        padded_tokens[:batch, :length] = tokens
        padded_lengths = np.ones(padded_batch, np.int32)  # rows added by the bucket: one token, results dropped
        padded_lengths[:batch] = lengths
        with GRAPH_LOCK:
            outputs = self._graph(self.manifest["prefill"])(Tensor(padded_tokens), Tensor(padded_lengths),
                                                             *self.weights)
        layers = self.config.num_hidden_layers
        arrays = [o.asnumpy()[:batch] for o in outputs]
        return arrays[0], arrays[1:1 + layers], arrays[1 + layers:]

    def prefill_long(self, prompt) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """One prompt longer than chunk_length, in chunks: the first as a whole prompt, each next one against the
        cache of those before it. Returns logits [V], keys [L][Hkv, D, T'] and values [L][Hkv, T', D], T' >= the
        prompt's length (positions past it hold nothing the caller may use)."""
        chunk, n = self.chunk_length, len(prompt)
        prompt = np.asarray(prompt, np.int32)
        starts = chunk_starts(n, chunk)
        width = max(starts[-1] + chunk, chunk_cache_length(starts[-1], chunk))
        logits, first_keys, first_values = self.prefill(prompt[None, :chunk], np.array([chunk], np.int32))
        c = self.config
        keys = [np.zeros((c.num_key_value_heads, c.head_dim, width), self.np_dtype) for _ in first_keys]
        values = [np.zeros((c.num_key_value_heads, width, c.head_dim), self.np_dtype) for _ in first_values]
        for cache, first in zip(keys, first_keys):
            cache[:, :, :chunk] = first[0, :, :, :chunk]
        for cache, first in zip(values, first_values):
            cache[:, :chunk] = first[0, :, :chunk]
        for start in starts:
            seq = chunk_cache_length(start, chunk)
            tokens = np.zeros((1, chunk), np.int32)
            piece = prompt[start:start + chunk]
            tokens[0, :len(piece)] = piece
            caches = [np.ascontiguousarray(k[None, :, :, :seq]) for k in keys]
            caches += [np.ascontiguousarray(v[None, :, :seq]) for v in values]
            with GRAPH_LOCK:
                outputs = self._graph(self.manifest["prefill_chunk"]["file"])(
                    Tensor(tokens), Tensor(np.array([start], np.int32)), Tensor(np.array([len(piece)], np.int32)),
                    *[Tensor.from_numpy(a) for a in caches], *self.weights)
            arrays = [o.asnumpy() for o in outputs]
            logits = arrays[0]
            for cache, new in zip(keys, arrays[1:1 + len(keys)]):
                cache[:, :, start:start + chunk] = new[0]
            for cache, new in zip(values, arrays[1 + len(keys):]):
                cache[:, start:start + chunk] = new[0]
        return logits[0], keys, values

    def decode(self, tokens: np.ndarray, positions: np.ndarray, caches: list[np.ndarray]):
        """Run the decode graph of the bucket given by the caches' shape ([B, Hkv, D, S] views).
        Returns logits [B, V], new keys [L][B, Hkv, D], new values [L][B, Hkv, D]; or logits, None, None when
        the graph wrote them into the caches itself (manifest "decode_writes_cache")."""
        batch, seq = caches[0].shape[0], caches[0].shape[-1]
        with GRAPH_LOCK:
            graph = self._graph(self.manifest["decode"][f"{batch}x{seq}"])
            outputs = graph(Tensor(tokens.astype(np.int32)), Tensor(positions.astype(np.int32)),
                            *[Tensor.from_numpy(c) for c in caches], *self.weights)
        if self.manifest.get("decode_writes_cache"):
            return outputs[0].asnumpy(), None, None
        layers = self.config.num_hidden_layers
        arrays = [o.asnumpy() for o in outputs]
        return arrays[0], arrays[1:1 + layers], arrays[1 + layers:]
