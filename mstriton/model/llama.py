"""A LLaMA network in MindSpore, written as functions of its weights.

The weights are arguments, not Parameters captured by a graph: every exported graph (one per static shape
bucket, see ``engine/buckets.py``) takes the same weight tensors as inputs, so one copy in memory serves all of
them. Static shapes matter on the CPU: a decode graph with dynamic dimensions ran 2-3x slower than the same graph
with static ones (measured; see ``benchmarks/engine.md``).

Entry points:
- ``LlamaPrefill``: right-padded prompts -> each prompt's last-position logits and its KV cache.
- ``LlamaPrefillChunk``: the next chunk of a long prompt, against the cache of the chunks before it.
- ``LlamaDecode``: one new token for each sequence of a batch, each at its own position, against the paged KV
  pool the caller owns and passes in as zero-copy numpy views, read through a block index (``engine/kv_pool.py``).
- ``LlamaLM``: the same network holding Parameters, for training the demo model.

Layout choices, each measured on a 2-core CPU:
- q/k/v and gate/up projections are fused into one matmul each, and weights are stored [in, out].
- The K cache is stored transposed, [batch, kv_heads, head_dim, seq], so scores are one batched matmul with no
  transpose inside the graph (MindSpore materializes every transpose).
- Grouped-query attention never repeats K/V: the query heads sharing a KV head become rows of one matmul.
- The decode graph does not write the cache; it returns the new token's K/V and attends to it separately
  (a two-part softmax), so the caller stores B*layers small rows and the graph copies no cache.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..config import LlamaConfig

# A large negative instead of -inf: exp() gives exactly 0 and no NaN appears for a fully masked row.
MASK_VALUE = -1e9
# The per-layer weights of a model without biases; layer_weight_names(config) gives those of any model.
LAYER_WEIGHTS = ("attention_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")
GLOBAL_WEIGHTS = ("embed_tokens", "norm", "lm_head")


def layer_weight_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """One layer's weights in the order graphs take them, each bias right after its matrix (matrices [in, out]).
    Without biases this is LAYER_WEIGHTS, so plain models keep the names and order of earlier engines.

    Biases (LLaMA's attention_bias/mlp_bias, Qwen2's q/k/v biases) are weight inputs only for models that have
    them, fused like their matrices: a zero bias added to a plain model would cost it an op per projection and
    layer (an op dispatch inside a CPU graph costs about 3 us)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"attention_norm": (c.hidden_size,), "wqkv": (c.hidden_size, q + 2 * kv)}
    if c.attention_bias:
        shapes["bqkv"] = (q + 2 * kv,)
    shapes["wo"] = (q, c.hidden_size)
    if c.o_proj_bias:
        shapes["bo"] = (c.hidden_size,)
    shapes.update(ffn_norm=(c.hidden_size,), w_gate_up=(c.hidden_size, 2 * c.intermediate_size))
    if c.mlp_bias:
        shapes["b_gate_up"] = (2 * c.intermediate_size,)
    shapes["w_down"] = (c.intermediate_size, c.hidden_size)
    if c.mlp_bias:
        shapes["b_down"] = (c.hidden_size,)
    return shapes


def layer_weight_names(config: LlamaConfig) -> tuple[str, ...]:
    return tuple(layer_weight_shapes(config))


def weight_names(config: LlamaConfig) -> list[str]:
    """The order in which graphs take their weight inputs: every layer's, then GLOBAL_WEIGHTS."""
    return list(weight_shapes(config))


def weight_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the weights as this network stores them (matrices [in, out])."""
    per_layer = layer_weight_shapes(c)
    shapes = {f"layers.{i}.{k}": v for i in range(c.num_hidden_layers) for k, v in per_layer.items()}
    shapes.update(embed_tokens=(c.vocab_size, c.hidden_size), norm=(c.hidden_size,),
                  lm_head=(c.hidden_size, c.vocab_size))
    assert tuple(shapes)[-len(GLOBAL_WEIGHTS):] == GLOBAL_WEIGHTS  # Network.embed/head index them from the end
    return shapes


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """The rotary frequencies [head_dim / 2], rewritten by the config's rope_scaling as transformers'
    ROPE_INIT_FUNCTIONS do (modeling_rope_utils: _compute_linear_scaling_rope_parameters,
    _compute_llama3_parameters). Computed in float64 where transformers uses float32: the same formulas, with
    less rounding in the angles of far positions."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":  # positions divided by factor, which is the same as frequencies
        return inv_freq / scaling.factor
    # llama3: long wavelengths (low frequencies) are interpolated by `factor`, short ones kept as trained, and
    # those between blended linearly in original_max_position_embeddings / wavelength.
    context = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = context / scaling.low_freq_factor, context / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_tables(config: LlamaConfig, positions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of shape [positions, head_dim] (default: max_position_embeddings), laid out for the rotate-half
    convention of HF LLaMA. linear and llama3 scaling leave transformers' attention_scaling at 1, so cos/sin are
    not rescaled."""
    inv_freq = rope_inv_freq(config)
    freqs = np.outer(np.arange(positions or config.max_position_embeddings, dtype=np.float64), inv_freq)
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


def rms_norm(x, weight, eps):
    x32 = x.astype(ms.float32)
    x32 = x32 * ops.rsqrt(ops.mean(x32 * x32, -1, keep_dims=True) + eps)
    return x32.astype(x.dtype) * weight


def last_axis_slice(x, start: int, end: int):
    """x[..., start:end] spelled per rank: a loaded dynamic-shape MindIR inferred the wrong width for the
    ellipsis form (and ops.split would not export with dynamic shapes)."""
    if x.ndim == 2:
        return x[:, start:end]
    return x[:, :, start:end]


def linear(x, weight, bias=None):
    """x [..., in] @ weight [in, out] (+ bias [out], only for a model that has one)."""
    if x.ndim == 2:
        y = ops.matmul(x, weight)
    else:
        b, e = x.shape[0], x.shape[2]
        y = ops.matmul(x.reshape(-1, e), weight).reshape(b, -1, weight.shape[1])
    if bias is not None:
        y = y + bias
    return y


class Network(nn.Cell):
    """The LLaMA math. ``weights`` is the tuple ordered as ``weight_names``.

    A layer's weights are found by name (``self.weight``), resolved to tuple positions while the graph is built:
    which weights a layer has depends on the config (biases)."""

    def __init__(self, c: LlamaConfig, dtype=ms.float32, max_positions: int | None = None,
                 formats: dict[str, str] | None = None):
        """`max_positions`: the longest sequence the graph will see (the engine's max_seq_len). The rotary
        tables are constants inside every exported graph, so they are cut to it: SmolLM2's 8192 positions
        would put 4 MB into each graph, Llama 3.1's 131072 positions 64 MB.

        `formats`: the packed format (``kernels/formats.py``) of each weight matrix, by weight name, for the CPU
        kernel path: the matrices are then uint8 [out, row_bytes] inputs and every weight product, the norms
        before them, SwiGLU, the residual adds, the embedding and decode attention run as the kernels' custom
        operators (``kernels/ops.py``). None: MindSpore's own ops on float32 [in, out] matrices (the reference
        path, and the one for Ascend and GPU)."""
        super().__init__()
        self.config = c
        self.n_layers, self.n_heads, self.n_kv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
        self.head_dim, self.groups, self.ffn_dim, self.eps = c.head_dim, c.num_query_groups, c.intermediate_size, \
            c.rms_norm_eps
        self.scale = 1.0 / float(np.sqrt(c.head_dim))
        self.qkv_sizes = (self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim)
        cos, sin = rope_tables(c, max_positions)
        self.cos, self.sin = Tensor(cos, dtype), Tensor(sin, dtype)
        names = layer_weight_names(c)
        self.n_per_layer = len(names)
        self.slots = {name: i for i, name in enumerate(names)}
        self.kernels = bool(formats)
        self.writes_cache = False
        if self.kernels:
            self._kernel_ops(c, formats)

    def _kernel_ops(self, c: LlamaConfig, formats: dict[str, str]) -> None:
        """One custom operator per fused step and layer (layers may differ in format), built before the graph."""
        from ..kernels import ops as kernel_ops
        self.eps_tensor = Tensor(np.array([c.rms_norm_eps], np.float32))
        per_layer = [{name: formats[f"layers.{i}.{name}"] for name in ("wqkv", "wo", "w_gate_up", "w_down")}
                     for i in range(c.num_hidden_layers)]
        self.op_qkv = tuple(kernel_ops.linear(f["wqkv"], "rmsnorm", int(c.attention_bias)) for f in per_layer)
        self.op_wo = tuple(kernel_ops.linear(f["wo"], "none", int(c.o_proj_bias) + 1) for f in per_layer)
        self.op_gate_up = tuple(kernel_ops.linear(f["w_gate_up"], "rmsnorm", int(c.mlp_bias)) for f in per_layer)
        self.op_down = tuple(kernel_ops.linear(f["w_down"], "swiglu", int(c.mlp_bias) + 1) for f in per_layer)
        self.op_head = kernel_ops.linear(formats["lm_head"], "rmsnorm", 0)
        self.op_embed = kernel_ops.embed(formats["embed_tokens"])
        self.op_attention = kernel_ops.decode_attention()
        # which layer's rows of the block index each attention call reads: constants of the graph
        self.layer_ids = tuple(Tensor(np.array([i], np.int32)) for i in range(c.num_hidden_layers))
        # A layer without biases whose matrices share one format decodes as one operator (kernel launches cost
        # tens of microseconds each here); others as the separate steps. Either way the kernels write each new
        # token's K/V into the pool in place: a step returns only the logits (LlamaDecode.writes_cache).
        biases = c.attention_bias or c.o_proj_bias or c.mlp_bias
        fused = not biases and all(len(set(f.values())) == 1 for f in per_layer)
        self.writes_cache = True
        self.op_layer = tuple(kernel_ops.decode_layer(f["wqkv"]) if fused else None for f in per_layer)

    def layer(self, weights, i):
        start = i * self.n_per_layer
        return weights[start:start + self.n_per_layer]

    def weight(self, w, name):
        """The weight `name` of one layer's tuple `w`, or None if this model has none (a missing bias)."""
        if name in self.slots:
            return w[self.slots[name]]
        return None

    def embed(self, weights, tokens):
        if self.kernels:  # the table is packed (tied models: the LM head); weights[-2] (the norm) gives its width
            return self.op_embed(tokens, weights[-3], weights[-2])
        return ops.gather(weights[-3], tokens, 0)

    def head(self, weights, h):
        """[N, E] hidden states -> [N, V] float32 logits."""
        if self.kernels:
            return self.op_head(h, weights[-2], self.eps_tensor, weights[-1])
        return linear(rms_norm(h, weights[-2], self.eps), weights[-1]).astype(ms.float32)

    def extras(self, w, bias_name, residual=None):
        """The optional inputs of a kernel product: the bias if the model has one, the residual if given."""
        bias = self.weight(w, bias_name)
        return ((bias,) if bias is not None else ()) + ((residual,) if residual is not None else ())

    def mlp(self, w, x, i):
        if self.kernels:
            gate_up = self.op_gate_up[i](x, self.weight(w, "ffn_norm"), self.eps_tensor, self.weight(w, "w_gate_up"),
                                         *self.extras(w, "b_gate_up"))
            return self.op_down[i](gate_up, self.weight(w, "w_down"), *self.extras(w, "b_down", x))
        gate_up = linear(rms_norm(x, self.weight(w, "ffn_norm"), self.eps), self.weight(w, "w_gate_up"),
                         self.weight(w, "b_gate_up"))
        gate, up = last_axis_slice(gate_up, 0, self.ffn_dim), last_axis_slice(gate_up, self.ffn_dim, 2 * self.ffn_dim)
        return x + linear(ops.silu(gate) * up, self.weight(w, "w_down"), self.weight(w, "b_down"))

    def attention_projection(self, w, x, out, i):
        """x plus the attention output [..., heads * head_dim] projected back to the hidden size."""
        if self.kernels:
            return self.op_wo[i](out, self.weight(w, "wo"), *self.extras(w, "bo", x))
        return x + linear(out, self.weight(w, "wo"), self.weight(w, "bo"))

    def qkv_product(self, w, x, i):
        """[..., E] -> [..., (H + 2 Hkv) D]: the attention norm and the fused q/k/v projection."""
        if self.kernels:
            return self.op_qkv[i](x, self.weight(w, "attention_norm"), self.eps_tensor, self.weight(w, "wqkv"),
                                  *self.extras(w, "bqkv"))
        return linear(rms_norm(x, self.weight(w, "attention_norm"), self.eps), self.weight(w, "wqkv"),
                      self.weight(w, "bqkv"))

    def qkv(self, w, x, i):
        qkv = self.qkv_product(w, x, i)
        q_end, k_end = self.qkv_sizes[0], self.qkv_sizes[0] + self.qkv_sizes[1]
        return last_axis_slice(qkv, 0, q_end), last_axis_slice(qkv, q_end, k_end), \
            last_axis_slice(qkv, k_end, k_end + self.qkv_sizes[2])

    def project(self, w, x, cos, sin, i):
        """x [B, T, E] -> scaled, rotated queries [B, Hkv, G*T, D] (the query heads of one KV group become rows),
        K^T [B, Hkv, D, T] and V [B, Hkv, T, D]. cos/sin broadcast against [B, H, T, D].

        Reshapes leave the dynamic dimensions as -1: a loaded dynamic-shape MindIR mis-inferred reshapes whose
        target multiplied two of them.
        """
        b = x.shape[0]
        q, k, v = self.qkv(w, x, i)
        q = q.reshape(b, -1, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(b, -1, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(b, -1, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        q = (q * cos + rotate_half(q) * sin) * self.scale
        k_t = (k * cos + rotate_half(k) * sin).transpose(0, 1, 3, 2)
        return q.reshape(b, self.n_kv, -1, self.head_dim), k_t, v

    def attention_out(self, w, x, out, i):
        """out [B, Hkv, G*T, D] (rows as ``project`` made them) -> the block's output [B, T, E]."""
        b = x.shape[0]
        out = out.reshape(b, self.n_heads, -1, self.head_dim).transpose(0, 2, 1, 3)
        out = out.reshape(b, -1, self.n_heads * self.head_dim)
        return self.mlp(w, self.attention_projection(w, x, out, i), i)

    def prefill_block(self, w, x, cos, sin, causal_mask, i):
        """x [B, T, E]; cos/sin [T, D]; causal_mask [G*T, T] -> x, K^T [B, Hkv, D, T], V [B, Hkv, T, D]."""
        q, k_t, v = self.project(w, x, cos, sin, i)
        scores = ops.matmul(q, k_t).astype(ms.float32) + causal_mask         # [B, Hkv, G*T, T]
        probs = ops.softmax(scores, -1).astype(v.dtype)
        return self.attention_out(w, x, ops.matmul(probs, v), i), k_t, v

    def chunk_block(self, w, x, cos, sin, mask, k_past, v_past, i):
        """A prompt chunk that attends to the cache of the chunks before it and to itself.
        x [B, C, E]; cos/sin [B, 1, C, D]; mask [B, 1, G*C, S+C]; k_past [B, Hkv, D, S]; v_past [B, Hkv, S, D]
        -> x, the chunk's K^T [B, Hkv, D, C] and V [B, Hkv, C, D].
        Keys are concatenated for one fused softmax: a two-part softmax (as in decode_block) made eight passes
        over the [G*C, S] scores and ran the chunk 1.7x slower than a whole prompt of its length."""
        q, k_t, v = self.project(w, x, cos, sin, i)
        keys, values = ops.concat((k_past, k_t), -1), ops.concat((v_past, v), -2)
        probs = ops.softmax(ops.matmul(q, keys).astype(ms.float32) + mask, -1).astype(v.dtype)
        return self.attention_out(w, x, ops.matmul(probs, values), i), k_t, v

    def decode_block(self, w, x, cos, sin, key_mask, k_cache, v_cache, i):
        """x [B, E]; cos/sin [B, 1, D]; key_mask [B, 1, 1, S]; k_cache [B, Hkv, D, S]; v_cache [B, Hkv, S, D]."""
        b = x.shape[0]
        q, k, v = self.qkv(w, x, i)
        q = q.reshape(b, self.n_heads, self.head_dim)
        k = k.reshape(b, self.n_kv, self.head_dim)
        q = (q * cos + rotate_half(q) * sin) * self.scale
        k = k * cos + rotate_half(k) * sin
        q = q.reshape(b, self.n_kv, self.groups, self.head_dim)
        # Scores against the cache and against the token itself, merged by one softmax without a concat.
        s_cache = ops.matmul(q, k_cache).astype(ms.float32) + key_mask            # [B, Hkv, G, S]
        s_self = (q * k.reshape(b, self.n_kv, 1, self.head_dim)).sum(-1, keepdims=True).astype(ms.float32)
        top = ops.maximum(s_cache.max(-1, keepdims=True), s_self)
        e_cache, e_self = ops.exp(s_cache - top), ops.exp(s_self - top)
        denom = e_cache.sum(-1, keepdims=True) + e_self
        out = ops.matmul(e_cache.astype(v_cache.dtype), v_cache) + \
            e_self.astype(v.dtype) * v.reshape(b, self.n_kv, 1, self.head_dim)
        out = (out / denom.astype(out.dtype)).reshape(b, self.n_heads * self.head_dim)
        return self.mlp(w, self.attention_projection(w, x, out, i), i), k, v.reshape(b, self.n_kv, self.head_dim)

    def decode_block_kernels(self, w, x, positions, pool, i):
        """decode_block as kernel operators: norm + q/k/v, attention over the paged cache in place (rotary and the
        cache update included), o-projection + residual, norm + gate/up, SwiGLU + down + residual; or all of it
        as one operator (op_layer) when the layer's matrices share a format."""
        k_pool, v_pool, block_index = pool
        if self.op_layer[i] is not None:
            return self.op_layer[i](x, positions, self.cos, self.sin, k_pool, v_pool, block_index, self.layer_ids[i],
                                    self.weight(w, "attention_norm"), self.eps_tensor, self.weight(w, "wqkv"),
                                    self.weight(w, "wo"), self.weight(w, "ffn_norm"), self.weight(w, "w_gate_up"),
                                    self.weight(w, "w_down"))
        qkv = self.qkv_product(w, x, i)
        out = self.op_attention(qkv, positions, self.cos, self.sin, k_pool, v_pool, block_index, self.layer_ids[i])
        return self.mlp(w, self.attention_projection(w, x, out, i), i)

    def gather_blocks(self, k_pool, v_pool, index):
        """One layer's cache of each sequence from its blocks: index [B, blocks] of pool rows -> K^T
        [B, Hkv, D, blocks * bs] and V [B, Hkv, blocks * bs, D] (MindSpore's ops: the path for Ascend and GPU,
        where the kernels' in-place attention does not run)."""
        b, n = index.shape
        bs = k_pool.shape[-1]
        k = ops.gather(k_pool, index.reshape(-1), 0).reshape(b, n, self.n_kv, self.head_dim, bs)
        v = ops.gather(v_pool, index.reshape(-1), 0).reshape(b, n, self.n_kv, bs, self.head_dim)
        k = k.transpose(0, 2, 3, 1, 4).reshape(b, self.n_kv, self.head_dim, n * bs)
        v = v.transpose(0, 2, 1, 3, 4).reshape(b, self.n_kv, n * bs, self.head_dim)
        return k, v

    def causal_mask(self, t: int):
        """[G*T, T]: the mask of T queries, repeated for the G query heads that share a KV head."""
        mask = ops.triu(ops.ones((t, t), ms.float32), 1) * MASK_VALUE
        return ops.tile(mask, (self.groups, 1)) if self.groups > 1 else mask

    def run_prompt(self, weights, tokens):
        t = tokens.shape[1]
        x = self.embed(weights, tokens)
        cos, sin, mask = self.cos[:t], self.sin[:t], self.causal_mask(t)
        keys, values = (), ()
        for i in range(self.n_layers):
            x, k_t, v = self.prefill_block(self.layer(weights, i), x, cos, sin, mask, i)
            keys += (k_t,)
            values += (v,)
        return x, keys, values

    def cache_mask(self, seq, filled):
        """[B, 1, 1, S]: 0 at the cache positions below each row's `filled` count, MASK_VALUE from there on."""
        visible = ops.arange(0, seq, dtype=ms.int32).reshape(1, -1) < filled.reshape(-1, 1)
        return ((1.0 - visible.astype(ms.float32)) * MASK_VALUE).reshape(filled.shape[0], 1, 1, seq)

    def last_logits(self, weights, x, lengths):
        """x [B, T, E] -> logits [B, V] at position lengths - 1 of each row."""
        b, t, e = x.shape
        last = ops.arange(0, b, dtype=ms.int32) * t + lengths - 1
        return self.head(weights, ops.gather(x.reshape(-1, e), last, 0))

    def prefill(self, weights, tokens, lengths):
        x, keys, values = self.run_prompt(weights, tokens)
        return (self.last_logits(weights, x, lengths),) + keys + values

    def prefill_chunk(self, weights, tokens, starts, lengths, caches):
        """tokens [B, C] right-padded, starts [B] (tokens already in the cache), lengths [B] (real tokens in
        the chunk), caches per layer K^T [B, Hkv, D, S] then V [B, Hkv, S, D], holding positions below starts."""
        b, c = tokens.shape
        x = self.embed(weights, tokens)
        limit = self.cos.shape[0] - 1  # padding past the last position must still index the tables
        positions = ops.minimum(starts.reshape(-1, 1) + ops.arange(0, c, dtype=ms.int32).reshape(1, -1), limit)
        cos = ops.gather(self.cos, positions.reshape(-1), 0).reshape(b, 1, -1, self.head_dim)
        sin = ops.gather(self.sin, positions.reshape(-1), 0).reshape(b, 1, -1, self.head_dim)
        seq = caches[0].shape[-1]
        past_mask = self.cache_mask(seq, starts)
        causal = self.causal_mask(c)                                               # [G*C, C]
        mask = ops.concat((ops.broadcast_to(past_mask, (b, 1, causal.shape[0], seq)),
                           ops.broadcast_to(causal.reshape(1, 1, -1, c), (b, 1, -1, -1))), -1)
        keys, values = (), ()
        for i in range(self.n_layers):
            x, k_t, v = self.chunk_block(self.layer(weights, i), x, cos, sin, mask, caches[i],
                                         caches[self.n_layers + i], i)
            keys += (k_t,)
            values += (v,)
        return (self.last_logits(weights, x, lengths),) + keys + values

    def decode(self, weights, tokens, positions, k_pool, v_pool, block_index):
        b = tokens.shape[0]
        x = self.embed(weights, tokens)
        if self.kernels:
            for i in range(self.n_layers):
                x = self.decode_block_kernels(self.layer(weights, i), x, positions, (k_pool, v_pool, block_index), i)
            return (self.head(weights, x),)
        cos = ops.gather(self.cos, positions, 0).reshape(b, 1, self.head_dim)
        sin = ops.gather(self.sin, positions, 0).reshape(b, 1, self.head_dim)
        key_mask = self.cache_mask(block_index.shape[-1] * k_pool.shape[-1], positions)
        new_k, new_v = (), ()
        for i in range(self.n_layers):
            k_cache, v_cache = self.gather_blocks(k_pool, v_pool, block_index[i])
            x, k, v = self.decode_block(self.layer(weights, i), x, cos, sin, key_mask, k_cache, v_cache, i)
            new_k += (k,)
            new_v += (v,)
        return (self.head(weights, x),) + new_k + new_v


class LlamaPrefill(Network):
    """Graph inputs: tokens [B, T] int32 right-padded, lengths [B] int32, then the weights.
    Outputs: logits [B, V] at each prompt's last token, K^T [B, Hkv, D, T] per layer, V [B, Hkv, T, D] per layer.

    Right padding needs no extra mask: padded keys come after every real query, so the causal mask hides them.
    """

    def construct(self, tokens, lengths, *weights):
        return self.prefill(weights, tokens, lengths)


class LlamaPrefillChunk(Network):
    """Graph inputs: tokens [B, C] int32 right-padded, starts [B] int32, lengths [B] int32, K^T caches
    [B, Hkv, D, S] per layer, V caches [B, Hkv, S, D] per layer, then the weights.
    Outputs: logits [B, V] at each chunk's last real token, the chunk's K^T [B, Hkv, D, C] and V [B, Hkv, C, D]
    per layer.

    A long prompt prefills as chunks of C tokens, each attending to the cache of those before it: the score
    matrices are [C, S] instead of [T, T], and MindSpore keeps the buffers of every shape it compiled, which for
    whole prompts grew with the square of their length (see ``engine/buckets.py``).
    """

    def construct(self, tokens, starts, lengths, *rest):
        n_cache = 2 * self.n_layers
        return self.prefill_chunk(rest[n_cache:], tokens, starts, lengths, rest[:n_cache])


class LlamaDecode(Network):
    """Graph inputs: tokens [B] int32, positions [B] int32 (where each token goes; the cache holds the positions
    below it), the paged pool K^T [L * N, Hkv, D, bs] and V [L * N, Hkv, bs, D], the block index [L, B, blocks]
    int32 (each sequence's pool rows, per layer; see ``engine/kv_pool.py``), then the weights.
    Outputs: logits [B, V] float32; on MindSpore's ops also the new token's K [B, Hkv, D] and V [B, Hkv, D] per
    layer, for the caller to store at ``positions`` (the CPU kernels store them in the pool themselves:
    ``writes_cache``).
    """

    def construct(self, tokens, positions, k_pool, v_pool, block_index, *weights):
        return self.decode(weights, tokens, positions, k_pool, v_pool, block_index)


class LlamaDecodeStep(Network):
    """LlamaDecode as one operator of the CPU kernels, its weights in one blob (``engine/weight_blob.py``):
    Graph inputs: tokens [B], positions [B], the pool K^T and V, the block index [L, B, blocks] (as LlamaDecode),
    the blob uint8 [bytes] and the LM head (a view of the blob: its shape gives the logits' width).
    Output: logits [B, V]; the new token's K/V are written into the pool. `layout`: where each weight is in the
    blob (weight_blob.step_layout), a constant of the graph."""

    def __init__(self, config: LlamaConfig, max_positions: int, layout: np.ndarray):
        super().__init__(config, ms.float32, max_positions)
        from ..kernels import ops as kernel_ops
        self.op_step = kernel_ops.decode_step()
        self.layout = Tensor(layout, ms.int32)
        self.eps_tensor = Tensor(np.array([config.rms_norm_eps], np.float32))
        self.writes_cache = True

    def construct(self, tokens, positions, k_pool, v_pool, block_index, blob, lm_head):
        return (self.op_step(tokens, positions, self.cos, self.sin, k_pool, v_pool, block_index, self.layout,
                             self.eps_tensor, blob, lm_head),)


class LlamaLM(Network):
    """The network with its weights as Parameters: what the demo model trains."""

    def __init__(self, config: LlamaConfig, dtype=ms.float32):
        super().__init__(config, dtype)
        self.weights = ParameterTuple([Parameter(Tensor(np.zeros(shape), dtype), name=name)
                                       for name, shape in weight_shapes(config).items()])

    def construct(self, tokens):
        """All-position logits [B, T, V]; no padding (every row is a full training window)."""
        x, _, _ = self.run_prompt(self.weights, tokens)
        b, t, e = x.shape
        return self.head(self.weights, x.reshape(b * t, e)).reshape(b, t, -1)
