"""Export the prefill and decode graphs to MindIR, and load them back for serving.

An engine directory holds:
    manifest.json          the model config, dtype, device, limits and buckets, and the file of every graph
    weights.ckpt           the weights, in the network's layout, as a MindSpore checkpoint
    prefill.mindir         one prefill graph, dynamic in batch and prompt length
    prefill_chunk.mindir   a chunk of a prompt against the cache of the tokens before it: long prompts, prompts
                           whose start the prefix cache holds, prefill between decode steps
    decode_b{B}_s{S}.mindir  one decode graph per static (batch, cache length) bucket, reading the paged pool
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
from ..model.llama import LlamaDecode, LlamaDecodeStep, LlamaPrefill, LlamaPrefillChunk, weight_names
from . import weight_blob
from .graph_call import LoadedGraph
from .buckets import DEFAULT_PREFILL_CHUNK, batch_buckets, prefill_lengths, prefill_shape, seq_buckets
from ..kernels.ops import portable_mindir
from .kv_pool import DEFAULT_BLOCK_SIZE
from .memory import aligned_copy
from .weight_formats import check_weights, pack_engine_weights

MANIFEST = "manifest.json"
WEIGHTS = "weights.ckpt"
PREFILL = "prefill.mindir"
PREFILL_CHUNK = "prefill_chunk.mindir"
# 2: decode graphs read a paged KV pool (kv_pool.py) and every engine has the chunked-prefill graph
ENGINE_FORMAT = 2
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
DEVICES = ("CPU", "Ascend", "GPU")


# Chunks after a prompt's first piece run at one length: every (chunk, cache) shape MindSpore compiles keeps its
# buffers for the life of the process, and with chunks of 64 to 256 tokens against caches of 64 to 2048 (24
# shapes) SmolLM2's warm-up took 94 s and 21 GB. The length is also the grain of prefill beside decode: a step
# of 16 SmolLM2 streams takes about 90 ms here and a 64-token chunk against a 1000-token cache about 280 ms more
# (streams' inter-token p99 7.6x their p50 with long prompts arriving, benchmarks/kv_cache.md); 32 tokens halve it.
CONTINUATION_TOKENS = 32


# Whole prompts prefill in calls of at most this many padded tokens (rows x length bucket): a batch of more runs as
# several calls. MindSpore keeps memory for every input shape the prefill graph has run at, for the life of the
# process, in proportion to the shape's tokens: for SmolLM2 about 1.6 MiB per token (the outputs of its every
# node), +211 MiB for 2 x 64, +1.6 GB for 16 x 64, +1.7 GB for 8 x 128, given back neither by
# mindspore.runtime.empty_cache() nor by malloc_trim. Batches of up to 16 prompts grew the decode process by 621 MB
# in a 6-minute soak, at the first bursts that made each new shape. At 256 tokens a call there are 7 shapes at the
# default prefill chunk (each length bucket alone, 2 x 64, 4 x 64, 2 x 128), all compiled at load (warm_up_prefill:
# about 1.1 GB more than batch 1 alone), and a call costs no more per token than a larger one (SmolLM2 Q4_1, best
# of 6 on a busy 2-core machine: 6.1 ms a token at 4 x 64, 5.3 at 2 x 128, 8.6 at 1 x 64; 16 x 64 was slower).
PREFILL_CALL_TOKENS = 256


def prefill_rows_per_call(padded_length: int) -> int:
    """Prompts of a length bucket that one prefill call runs: a power of two (batches pad to one), at least 1."""
    rows = 1
    while rows * 2 * padded_length <= PREFILL_CALL_TOKENS:
        rows *= 2
    return rows


def prefill_call_shapes(max_length: int, max_seq_len: int) -> list[tuple[int, int]]:
    """Every (rows, length bucket) a prefill call of whole prompts of up to `max_length` tokens runs at."""
    shapes = []
    for length in prefill_lengths(max_length):
        padded = prefill_shape(1, length, max_seq_len)[1]
        rows = 1
        while rows <= prefill_rows_per_call(padded):
            shapes.append((rows, padded))
            rows *= 2
    return shapes


def continuation_tokens(chunk_length: int) -> int:
    return min(CONTINUATION_TOKENS, chunk_length)


def blocks_for(seq: int, block_size: int) -> int:
    """Blocks of a decode graph's block index for a cache bucket of `seq` positions."""
    return -(-seq // block_size)


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
                  kv_block_size: int = DEFAULT_BLOCK_SIZE,
                  blocks: dict[str, np.ndarray] | None = None, block_types: dict[str, str] | None = None,
                  interleave_blocks: bool = False, progress: Callable[[str], None] = print) -> dict:
    """Write an engine directory. `weights` are in the network's layout (see ``model/weights.py``);
    `weights_format` is one of weight_formats.WEIGHT_CHOICES (`blocks`: a GGUF file's own, see there;
    `interleave_blocks`: the block formats regrouped for int8 activations, see there)."""
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
    if not 1 <= kv_block_size <= 256:
        raise ValueError(f"kv_block_size must be in [1, 256] tokens, got {kv_block_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ms_dtype = DTYPES[dtype]
    names = weight_names(config)
    # a tied model's LM head is its embedding table: counted once
    n_parameters = sum(w.size for n, w in weights.items() if not (n == "lm_head" and config.tie_word_embeddings))
    stored, formats = pack_engine_weights(config, weights, weights_format, blocks, block_types, progress,
                                          interleave_blocks=interleave_blocks)
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
    # The chunk graph also continues prompts whose start the prefix cache holds, so every engine has it; prompts
    # longer than `prefill_chunk` (0: none) prefill in chunks of it.
    chunk_length = prefill_chunk if 0 < prefill_chunk < max_seq_len else max_seq_len
    progress(f"exporting the chunked-prefill graph (chunks of up to {chunk_length} tokens)")
    layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    cache_specs = [Tensor(shape=[None, kv, hd, None], dtype=ms_dtype)] * layers
    cache_specs += [Tensor(shape=[None, kv, None, hd], dtype=ms_dtype)] * layers
    _export(LlamaPrefillChunk(config, ms_dtype, max_seq_len, **network_args),
            [Tensor(shape=[None, None], dtype=ms.int32)] + [Tensor(shape=[None], dtype=ms.int32)] * 2
            + cache_specs + weight_specs, out_dir / PREFILL_CHUNK)
    chunk = {"file": PREFILL_CHUNK, "length": chunk_length}

    # Benchmarks may ask for a subset of buckets; serving uses the full ladders.
    batches, seqs = batches or batch_buckets(max_batch_size), seqs or seq_buckets(max_seq_len)
    # On the CPU kernels, a model without biases decodes a step as one operator over one weight blob
    # (weight_blob.py): 7 graph inputs instead of one per weight.
    step = None
    if weight_blob.step_supported(config, formats):
        ordered = [arrays[n] for n in names]
        layout = weight_blob.step_layout(config, names, ordered, formats)
        step = {"layout": layout.tolist(), "blob_bytes": weight_blob.offsets(names, ordered)[1]}
        decode = LlamaDecodeStep(config, max_seq_len, layout)
        weight_specs_decode = [Tensor(shape=[step["blob_bytes"]], dtype=ms.uint8), spec(arrays["lm_head"])]
        progress(f"decode steps run as one operator over a {step['blob_bytes'] / 1e6:.0f} MB weight blob")
    else:
        decode = LlamaDecode(config, ms_dtype, max_seq_len, **network_args)
        weight_specs_decode = weight_specs
    layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    decode_files = {}
    writes_cache = decode.writes_cache  # the decode graphs store the new K/V into the pool they are given
    total, started = len(batches) * len(seqs), time.monotonic()
    for b in batches:
        for s in seqs:
            # the pool's block count is the server's choice (bytes): dynamic; the step's shapes are static
            inputs = [Tensor(shape=[b], dtype=ms.int32), Tensor(shape=[b], dtype=ms.int32),
                      Tensor(shape=[None, kv, hd, kv_block_size], dtype=ms_dtype),
                      Tensor(shape=[None, kv, kv_block_size, hd], dtype=ms_dtype),
                      Tensor(shape=[layers, b, blocks_for(s, kv_block_size)], dtype=ms.int32)]
            _export(decode, inputs + weight_specs_decode, out_dir / decode_file(b, s))
            decode_files[f"{b}x{s}"] = decode_file(b, s)
            done = len(decode_files)
            eta = (time.monotonic() - started) / done * (total - done)
            progress(f"exported decode graph {done}/{total} (batch {b}, cache {s}), about {eta:.0f}s left")

    manifest = {"format": ENGINE_FORMAT, "kv_block_size": kv_block_size, "config": config.to_hf_dict(), "dtype": dtype, "device": device,
                "max_batch_size": max_batch_size, "max_seq_len": max_seq_len,
                "batch_buckets": batches, "seq_buckets": seqs, "weights": WEIGHTS, "weight_names": names,
                "weights_format": weights_format, "weight_formats": formats, "weight_aliases": aliases,
                "decode_writes_cache": writes_cache, "decode_step": step,
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
        if self.manifest.get("format", 1) != ENGINE_FORMAT:
            raise ValueError(f"{self.dir} was converted by an older mstriton (engine format "
                             f"{self.manifest.get('format', 1)}, this one reads {ENGINE_FORMAT}: decode graphs over a "
                             f"paged KV cache); convert the checkpoint again")
        self.block_size = self.manifest["kv_block_size"]
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
        self.step = self.manifest.get("decode_step")
        names = self.manifest["weight_names"]
        if self.step:  # one blob (weight_blob.py); every weight is a view of it
            loaded = {n: params[n].asnumpy() for n in params}
            self.blob, self.weight_arrays = weight_blob.build(names, [loaded[aliases.get(n, n)] for n in names])
            layout = weight_blob.step_layout(self.config, names, self.weight_arrays, self.manifest["weight_formats"])
            if layout.tolist() != self.step["layout"] or self.blob.nbytes < self.step["blob_bytes"]:
                raise ValueError(f"{self.dir}: the weights do not lay out as the decode graphs were exported")
            self.blob = self.blob[:self.step["blob_bytes"]]
            self.step_inputs = [Tensor.from_numpy(self.blob),
                                Tensor.from_numpy(self.weight_arrays[names.index("lm_head")])]
        else:
            loaded = {n: aligned_copy(params[n].asnumpy()) for n in params}
            # An alias is the same array (a tied, packed embedding table is the LM head): in memory once.
            self.weight_arrays = [loaded[aliases.get(n, n)] for n in names]
        del params, loaded
        self.weights = [Tensor.from_numpy(a) for a in self.weight_arrays]
        if self.device != "CPU":  # keep weights resident on the accelerator instead of copying them per call
            self.weights = [w.move_to(self.device) for w in self.weights]
        self._graphs: dict[str, LoadedGraph] = {}
        # prompts longer than this prefill in chunks; shorter ones may run as whole prompts (prefill)
        self.chunk_length = self.manifest["prefill_chunk"]["length"]
        # what the chunk graph computes per call after the first piece (continuation_tokens)
        self.continuation = continuation_tokens(self.chunk_length)

    def weight_bytes_per_step(self) -> int:
        """Bytes one decode step reads from the weights: everything but the embedding table (rows are gathered;
        a tied packed table is the LM head, which is read whole)."""
        names, aliases = self.manifest["weight_names"], self.manifest.get("weight_aliases", {})
        read = {id(a): a.nbytes for n, a in zip(names, self.weight_arrays) if n != "embed_tokens" or n in aliases}
        return sum(read.values())

    def _graph(self, file: str) -> LoadedGraph:
        if file not in self._graphs:
            # Graphs calling the CPU kernels name the library by its path at export: point them at this one's.
            self._graphs[file] = LoadedGraph(ms.load(portable_mindir(self.dir / file)))
        return self._graphs[file]

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray):
        """tokens [B, T] int32 right-padded; returns logits [B, V], keys [L][B, Hkv, D, T'], values
        [L][B, Hkv, T', D] as numpy arrays, where T' >= T is the length bucket the graph ran at (see buckets.py);
        positions past a prompt's length hold nothing the caller may use. Runs as calls of at most
        prefill_rows_per_call(T') prompts (PREFILL_CALL_TOKENS)."""
        batch, length = tokens.shape
        per_call = prefill_rows_per_call(prefill_shape(1, length, self.max_seq_len)[1])
        if batch > per_call:
            parts = [self.prefill(tokens[i:i + per_call], lengths[i:i + per_call]) for i in range(0, batch, per_call)]
            layers = self.config.num_hidden_layers
            return (np.concatenate([p[0] for p in parts]),
                    [np.concatenate([p[1][layer] for p in parts]) for layer in range(layers)],
                    [np.concatenate([p[2][layer] for p in parts]) for layer in range(layers)])
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

    def prefill_chunk(self, tokens: np.ndarray, start: int, past_keys: list[np.ndarray],
                      past_values: list[np.ndarray]):
        """The tokens [C'] (at most `continuation`) of one sequence from position `start` on, against the cache of
        the `start` tokens before them: per layer K^T [1, Hkv, D, S] and V [1, Hkv, S, D], S >= start (positions
        past `start` are ignored). Returns the logits of its last token [V], its K^T [L][Hkv, D, C'] and V
        [L][Hkv, C', D]."""
        count = len(tokens)
        if count > self.continuation:
            raise ValueError(f"a chunk of {count} tokens; the chunk graph runs at most {self.continuation}")
        padded = np.zeros((1, self.continuation), np.int32)  # one chunk length: one compiled shape per S
        padded[0, :count] = tokens
        with GRAPH_LOCK:
            outputs = self._graph(self.manifest["prefill_chunk"]["file"])(
                Tensor(padded), Tensor(np.array([start], np.int32)), Tensor(np.array([count], np.int32)),
                *[Tensor.from_numpy(a) for a in past_keys], *[Tensor.from_numpy(a) for a in past_values],
                *self.weights)
        layers = self.config.num_hidden_layers
        arrays = [o.asnumpy() for o in outputs]
        return arrays[0][0], [k[0, :, :, :count] for k in arrays[1:1 + layers]], \
            [v[0, :, :count] for v in arrays[1 + layers:]]

    def decode(self, tokens: np.ndarray, positions: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
               block_index: np.ndarray):
        """Run the decode graph of the bucket given by the block index [L, B, blocks] over the paged pool.
        Returns logits [B, V], new keys [L][B, Hkv, D], new values [L][B, Hkv, D]; or logits, None, None when
        the graph wrote them into the pool itself (manifest "decode_writes_cache")."""
        batch = block_index.shape[1]
        seq = min(s for s in self.seq_buckets if blocks_for(s, self.block_size) == block_index.shape[2])
        with GRAPH_LOCK:
            graph = self._graph(self.manifest["decode"][f"{batch}x{seq}"])
            outputs = graph(Tensor(tokens.astype(np.int32)), Tensor(positions.astype(np.int32)),
                            Tensor.from_numpy(k_pool), Tensor.from_numpy(v_pool), Tensor.from_numpy(block_index),
                            *(self.step_inputs if self.step else self.weights))
        if self.manifest.get("decode_writes_cache"):
            return outputs[0].asnumpy(), None, None
        layers = self.config.num_hidden_layers
        arrays = [o.asnumpy() for o in outputs]
        return arrays[0], arrays[1:1 + layers], arrays[1 + layers:]
