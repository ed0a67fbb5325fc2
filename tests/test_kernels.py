"""The C++ kernels (mstriton/kernels) against numpy, on every ISA this CPU runs (AVX-512, AVX2, the SSE2
fallback), every weight format, and odd shapes: rows 1 to 64 (both GEMV paths and the GEMM), K not a multiple of
the vector width or of the 32-value block, N not a multiple of the channel groups.

The references: numpy's matmul on the dequantized matrix, where the block formats are dequantized by the `gguf`
package (llama.cpp's own Python code) and bfloat16 rounding is torch's; the attention reference is written out
below with numpy from the formulas (rotate-half rotary, softmax over the cache and the new token).
"""

from __future__ import annotations

import numpy as np
import pytest

from mstriton import kernels
from mstriton.kernels.formats import (FORMATS, INTERLEAVED, GROUP, K_QUANT_FORMATS, deinterleave, interleave, pack,
                                     row_bytes, unpack)

# the formats packed from float32 here; the K-quants come only from files (tests/test_kernels_kquants.py)
PACKED = [fmt for fmt in FORMATS if fmt not in K_QUANT_FORMATS]

ISAS = kernels.supported_isas()
SHAPES = [(1, 32, 1), (1, 576, 577), (2, 100, 33), (3, 64, 7), (4, 96, 9), (5, 576, 66), (16, 200, 64),
          (17, 96, 9), (32, 1536, 70), (33, 64, 70), (64, 100, 65)]


@pytest.fixture(params=ISAS)
def isa(request):
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(ISAS[0])


def channels(fmt: str, n: int) -> int:
    """N as the format takes it: the interleaved formats hold whole groups of 8 channels."""
    return -(-n // GROUP) * GROUP if fmt in INTERLEAVED else n


def relative(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def test_the_library_builds_and_picks_the_best_isa():
    assert kernels.isa() in kernels.ISAS and "generic" in ISAS
    assert kernels.threads() >= 1


@pytest.mark.parametrize("fmt", PACKED)
def test_products_equal_numpy_on_the_dequantized_matrix(isa, fmt):
    rng = np.random.default_rng(FORMATS[fmt])
    for m, k, n in SHAPES:
        n = channels(fmt, n)
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((m, k)).astype(np.float32)
        packed = pack(fmt, w)
        assert packed.shape == (n, row_bytes(fmt, k))
        expected = x.astype(np.float64) @ unpack(fmt, packed, k).T.astype(np.float64)
        error = relative(kernels.linear(fmt, x, packed), expected)
        assert error < 2e-6, f"{isa} {fmt} m={m} k={k} n={n}: relative error {error}"


@pytest.mark.parametrize("m", [1, 3, 8, 40])
def test_fused_norm_swiglu_bias_and_residual(isa, m):
    rng = np.random.default_rng(m)
    k, n, eps = 96, 50, 1e-5
    x = rng.standard_normal((m, k)).astype(np.float32)
    g = rng.standard_normal(k).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias, residual = rng.standard_normal(n).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)
    packed = pack("Q8_0", w)
    dense = unpack("Q8_0", packed, k).T

    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g
    got = kernels.linear("Q8_0", x, packed, pre="rmsnorm", norm=g, eps=eps, bias=bias)
    assert relative(got, normed @ dense + bias) < 2e-6

    gate_up = rng.standard_normal((m, 2 * k)).astype(np.float32)
    gate, up = gate_up[:, :k], gate_up[:, k:]
    swiglu = gate / (1 + np.exp(-gate.astype(np.float64))) * up
    got = kernels.linear("Q8_0", gate_up, packed, pre="swiglu", residual=residual)
    assert relative(got, swiglu @ dense + residual) < 2e-6


@pytest.mark.parametrize("fmt", PACKED)
def test_embedding_rows_are_the_dequantized_rows(isa, fmt):
    rng = np.random.default_rng(7)
    vocab, dim = channels(fmt, 50), 96
    table = pack(fmt, rng.standard_normal((vocab, dim)).astype(np.float32))
    tokens = np.array([[0, 49, 7], [3, 3, 12]], np.int32)
    np.testing.assert_array_equal(kernels.embed(fmt, tokens, table, dim), unpack(fmt, table, dim)[tokens])


@pytest.mark.parametrize("fmt", list(INTERLEAVED))
def test_interleaved_blocks_are_the_plain_blocks_regrouped(fmt):
    """The layout of csrc/formats.h, byte by byte: group g's block b holds the 8 channels' d (and m), then vector i
    = bytes 4i .. 4i+3 of each channel's values; deinterleave undoes it; N must be whole groups."""
    base = INTERLEAVED[fmt]
    rng = np.random.default_rng(11)
    plain = pack(base, rng.standard_normal((16, 96)).astype(np.float32))
    grouped = interleave(base, plain)
    np.testing.assert_array_equal(grouped, pack(fmt, unpack(base, plain, 96)))
    np.testing.assert_array_equal(deinterleave(base, grouped), plain)
    size, head = {"Q8_0": (34, 2), "Q4_0": (18, 2), "Q4_1": (20, 4)}[base]
    for g in range(2):
        flat = grouped[8 * g:8 * g + 8].reshape(-1)
        for b in range(3):
            block = flat[b * 8 * size:(b + 1) * 8 * size]
            for c in range(8):
                mine = plain[8 * g + c, b * size:(b + 1) * size]
                assert bytes(block[2 * c:2 * c + 2]) == bytes(mine[:2])
                if head == 4:
                    assert bytes(block[16 + 2 * c:18 + 2 * c]) == bytes(mine[2:4])
                for i in range((size - head) // 4):
                    at = 8 * head + 32 * i + 4 * c
                    assert bytes(block[at:at + 4]) == bytes(mine[head + 4 * i:head + 4 * i + 4])
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(fmt, rng.standard_normal((12, 96)).astype(np.float32))
    with pytest.raises(ValueError):
        kernels.linear(fmt, np.ones((1, 96), np.float32), grouped[:12])


def reference_attention(qkv, positions, cos, sin, k_cache, v_cache, heads):
    b, kv, d, _ = k_cache.shape
    groups = heads // kv

    def rotate(x, p):
        half = d // 2
        return x * cos[p] + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin[p]

    out = np.zeros((b, heads * d))
    k_new, v_new = np.zeros((b, kv, d)), np.zeros((b, kv, d))
    for row in range(b):
        p = positions[row]
        q = qkv[row, :heads * d].reshape(heads, d).astype(np.float64)
        k = qkv[row, heads * d:(heads + kv) * d].reshape(kv, d)
        v = qkv[row, (heads + kv) * d:].reshape(kv, d)
        k_new[row], v_new[row] = rotate(k, p), v
        for h in range(heads):
            g = h // groups
            keys = np.concatenate([k_cache[row, g, :, :p].T, k_new[row, g][None]], 0)     # [p + 1, D]
            values = np.concatenate([v_cache[row, g, :p], v_new[row, g][None]], 0)
            scores = keys @ rotate(q[h], p) / np.sqrt(d)
            probs = np.exp(scores - scores.max())
            out[row, h * d:(h + 1) * d] = probs @ values / probs.sum()
    return out, k_new, v_new


def paged(k_cache, v_cache, block_size, rng):
    """The contiguous caches [B, Hkv, D, S] / [B, Hkv, S, D] as a pool of blocks in shuffled rows (row 0 left as
    scratch), and each sequence's block table."""
    b, kv, d, seq = k_cache.shape
    per_row = -(-seq // block_size)
    rows = rng.permutation(b * per_row) + 1  # scattered, as a pool in use is
    k_pool = np.zeros((b * per_row + 1, kv, d, block_size), np.float32)
    v_pool = np.zeros((b * per_row + 1, kv, block_size, d), np.float32)
    table = rows.reshape(b, per_row).astype(np.int32)
    for row in range(b):
        for i in range(per_row):
            n = min(block_size, seq - i * block_size)
            k_pool[table[row, i], :, :, :n] = k_cache[row, :, :, i * block_size:i * block_size + n]
            v_pool[table[row, i], :, :n] = v_cache[row, :, i * block_size:i * block_size + n]
    return k_pool, v_pool, table


def attention_case(rng, heads, kv, d, b, seq, table_len):
    """Random q/k/v rows for `b` sequences, rotary tables of `table_len` positions, and each sequence's cache of
    `seq` positions: (qkv, cos, sin, k_cache [b, kv, d, seq], v_cache [b, kv, seq, d])."""
    qkv = rng.standard_normal((b, (heads + 2 * kv) * d)).astype(np.float32)
    angles = np.outer(np.arange(table_len), 1.0 / 10000 ** (np.arange(0, d, 2) / d))
    angles = np.concatenate([angles, angles], -1)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    k_cache = rng.standard_normal((b, kv, d, seq)).astype(np.float32)
    v_cache = rng.standard_normal((b, kv, seq, d)).astype(np.float32)
    return qkv, cos, sin, k_cache, v_cache


# (10, 2, 128, 16): 5 query heads per KV head (whole blocks take them 4 at a time) and d of two register chunks;
# (8, 1, 72, 16): d past whole chunks (the last values one at a time)
@pytest.mark.parametrize("heads,kv,d,block_size", [(9, 3, 64, 16), (4, 4, 32, 8), (6, 2, 20, 5), (10, 2, 128, 16),
                                                   (8, 1, 72, 16)])
def test_paged_decode_attention_equals_the_formula_and_stores_the_new_token(isa, heads, kv, d, block_size):
    rng = np.random.default_rng(heads)
    b = 5
    qkv, cos, sin, k_cache, v_cache = attention_case(rng, heads, kv, d, b, seq=40, table_len=64)
    positions = np.array([0, 1, 17, 36, 39], np.int32)  # an empty cache, a nearly full one, and between
    k_pool, v_pool, table = paged(k_cache, v_cache, block_size, rng)
    expected, k_new, v_new = reference_attention(qkv, positions, cos, sin, k_cache, v_cache, heads)
    # the whole batch, and batches of one and two sequences: with fewer (sequence, KV head) tasks than two per
    # thread the kernel cuts each sequence's blocks into parts and merges their softmax sums
    for rows in (list(range(b)), [3], [4], [4, 2]):
        pools = k_pool.copy(), v_pool.copy()
        got = kernels.decode_attention(qkv[rows], positions[rows], cos, sin, *pools, table[rows], heads)
        assert relative(got, expected[rows]) < 1e-5, (isa, rows)
        for row in rows:  # the new token's K/V landed in its block at its offset
            p = positions[row]
            block, offset = table[row, p // block_size], p % block_size
            assert relative(pools[0][block, :, :, offset], k_new[row]) < 1e-6
            assert relative(pools[1][block, :, offset], v_new[row]) < 1e-6


def test_paged_attention_padding_rows_touch_only_the_scratch_block(isa):
    rng = np.random.default_rng(7)
    heads, kv, d, bs = 4, 2, 16, 8
    k_pool = rng.standard_normal((6, kv, d, bs)).astype(np.float32)
    v_pool = rng.standard_normal((6, kv, bs, d)).astype(np.float32)
    before_k, before_v = k_pool[1:].copy(), v_pool[1:].copy()
    qkv = rng.standard_normal((3, (heads + 2 * kv) * d)).astype(np.float32)
    cos, sin = np.ones((32, d), np.float32), np.zeros((32, d), np.float32)
    out = kernels.decode_attention(qkv, np.zeros(3, np.int32), cos, sin, k_pool, v_pool, np.zeros((3, 2), np.int32),
                                   heads)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(k_pool[1:], before_k)
    np.testing.assert_array_equal(v_pool[1:], before_v)


def test_bfloat16_rounding_is_torchs():
    import torch
    w = np.random.default_rng(3).standard_normal((64, 33)).astype(np.float32) * 1e3
    expected = torch.from_numpy(w).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(unpack("BF16", pack("BF16", w), 33), expected)


def test_int8_rounds_each_channel_to_its_own_scale():
    w = np.random.default_rng(4).standard_normal((20, 45)).astype(np.float32)
    w[3] *= 1000  # one loud channel does not coarsen the others
    back = unpack("INT8", pack("INT8", w), 45)
    step = np.abs(w).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)


def test_gguf_blocks_pack_as_the_gguf_package_quantizes():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    w = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    for fmt in ("Q8_0", "Q4_0", "Q4_1"):
        np.testing.assert_array_equal(pack(fmt, w), quantize(w, GGMLQuantizationType[fmt]))


def test_machine_floors_are_measured():
    from mstriton.kernels import activations

    assert kernels.read_bandwidth(64 << 20, reps=2) > 0.5
    assert kernels.fma_peak(1_000_000) > 1.0
    for name in activations.supported_int8_isas():  # every int8 dot product's own peak
        activations.set_int8_isa(name)
        assert kernels.int8_peak(20_000 if name == "generic" else 1_000_000) > 0.1, name
    kernels.set_isa(ISAS[0])


def test_pool_survives_many_small_calls_from_two_threads():
    """Workers late for a call (descheduled, or waking) once left the pool's count of joined workers at -1 and the
    next call spun forever: two threads making many small parallel calls at once must all finish."""
    import threading
    import time

    w = pack("Q4_1", np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32))
    x = np.ones((8, 64), np.float32)
    expected = kernels.linear("Q4_1", x, w)
    stop, calls, wrong = time.monotonic() + 4, [0, 0], []

    def loop(i):
        while time.monotonic() < stop:
            if not np.array_equal(kernels.linear("Q4_1", x, w), expected):
                wrong.append(i)
            calls[i] += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a kernel call never returned"
    assert not wrong and min(calls) > 100


UNLOAD_BY_CTYPES = """
import ctypes, _ctypes, sys, time
import numpy as np
path = sys.argv[1]
k, n = 64, 256
x, w, y = np.ones((1, k), np.float32), np.ones((n, k), np.float32), np.empty((1, n), np.float32)
for _ in range(3):
    lib = ctypes.CDLL(path)
    lib.mst_linear.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3
    for _ in range(20):  # F32 products on 2 threads: the pool's worker is spinning when they return
        lib.mst_linear(0, 0, x.ctypes.data, 1, k, None, 0.0, w.ctypes.data, n, None, None, y.ctypes.data)
    assert (y == k).all()
    _ctypes.dlclose(lib._handle)  # its only handle: what MindSpore does when its last graph calling it goes
    print("mapped" if any(path.rsplit("/", 1)[1] in line for line in open("/proc/self/maps")) else "unmapped")
    time.sleep(0.05)  # the worker runs on meanwhile
"""


def test_pool_workers_survive_the_last_dlclose_of_the_library():
    """The pool's workers outlive every call and run the library's code between calls; MindSpore dlcloses an AOT
    operator's library when its last kernel goes, and a worker then returned into unmapped memory (SIGSEGV, issue
    25: `test_graphs_load_from_another_folder_with_the_library_elsewhere` died at the interpreter's exit). The
    library is linked NODELETE: it stays mapped, and the process lives on. In a fresh process, where this handle
    is the library's only one."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", UNLOAD_BY_CTYPES, str(kernels.LIBRARY)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "MSTRITON_KERNEL_THREADS": "2"})
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.split() == ["mapped"] * 3


UNLOAD_BY_MINDSPORE = """
import gc, sys, time
import numpy as np
import mindspore as ms
from mindspore import nn
from mstriton.kernels import LIBRARY
from mstriton.kernels import ops as kernel_ops
from mstriton.kernels.formats import pack

class Product(nn.Cell):
    def __init__(self, fmt):
        super().__init__()
        self.op = kernel_ops.linear(fmt, "none", 0)

    def construct(self, x, w):
        return self.op(x, w)

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
x = ms.Tensor(np.ones((1, 64), np.float32))
for fmt in ("INT8", "Q8_0"):
    w = ms.Tensor(pack(fmt, np.ones((256, 64), np.float32)))
    net = Product(fmt)
    for _ in range(20):
        y = net(x, w).asnumpy()
    assert np.allclose(y, 64, rtol=1e-3), y
    del net, y
    kernel_ops.custom_op.cache_clear()
    gc.collect()  # the graph's kernels go: MindSpore dlcloses the library
    print("mapped" if any(LIBRARY.name in line for line in open("/proc/self/maps")) else "unmapped", flush=True)
    time.sleep(0.05)
"""


def test_a_process_lives_on_after_mindspore_drops_its_last_graph_calling_the_kernels(tmp_path):
    """Issue 25's pattern in MindSpore itself: graphs calling the kernels run, are collected (their kernels'
    destructor dlcloses the library), and the process goes on (the next test case, or the interpreter's exit)
    while the pool's worker is still in its spin. Before the library was linked NODELETE this died with SIGSEGV
    on the first graph, every time."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "unload_by_mindspore.py"  # GRAPH_MODE compiles from source: a file, not -c
    script.write_text(UNLOAD_BY_MINDSPORE)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=root, env={**os.environ, "MSTRITON_KERNEL_THREADS": "2",
                                           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.split() == ["mapped"] * 2


@pytest.mark.parametrize("block_size", [16, 5])
def test_paged_decode_attention_of_a_sequence_is_the_same_alone_or_in_any_batch(isa, block_size):
    """Bit for bit: a greedy answer must not depend on what runs beside it (a batch-dependent cut of the sequences
    into parts changed a row's sums by about 1e-5, and int8 activations made other tokens of that)."""
    rng = np.random.default_rng(11)
    heads, b = 9, 6
    qkv, cos, sin, k_cache, v_cache = attention_case(rng, heads, 3, 64, b, seq=150, table_len=256)
    positions = np.array([0, 3, 40, 77, 120, 149], np.int32)
    k_pool, v_pool, table = paged(k_cache, v_cache, block_size, rng)
    wide = np.concatenate([table, np.zeros((b, 7), np.int32)], 1)  # a wider table: a longer cache bucket
    whole = kernels.decode_attention(qkv, positions, cos, sin, k_pool.copy(), v_pool.copy(), table, heads)
    for rows in ([0], [3], [5], [4, 1], [2, 5, 0]):
        for t in (table, wide):
            got = kernels.decode_attention(qkv[rows], positions[rows], cos, sin, k_pool.copy(), v_pool.copy(), t[rows],
                                           heads)
            assert np.array_equal(got, whole[rows]), (isa, rows, t.shape)


@pytest.mark.parametrize("block_size", [16, 5])
def test_rows_of_one_sequence_at_consecutive_positions_are_the_steps_one_after_another(isa, block_size):
    """A speculative step verifies drafted tokens as extra rows of one sequence, at the positions after its newest
    token: each row must attend to the rows before it, bit for bit as if they had been decoded in earlier steps
    (every row's K/V is stored before any row attends)."""
    rng = np.random.default_rng(5)
    heads, kv, d, first, count = 8, 2, 32, 61, 6
    qkv, cos, sin, k_cache, v_cache = attention_case(rng, heads, kv, d, count, seq=first + count, table_len=128)
    k_pool, v_pool, table = paged(k_cache[:1], v_cache[:1], block_size, rng)  # one sequence's cache
    positions = np.arange(first, first + count, dtype=np.int32)
    tables = np.repeat(table, count, axis=0)
    pools = k_pool.copy(), v_pool.copy()
    together = kernels.decode_attention(qkv, positions, cos, sin, *pools, tables, heads)
    alone_pools = k_pool.copy(), v_pool.copy()
    for row in range(count):  # the same rows, one step at a time, each after the one before stored its K/V
        alone = kernels.decode_attention(qkv[row:row + 1], positions[row:row + 1], cos, sin, *alone_pools, table,
                                         heads)
        assert np.array_equal(alone[0], together[row]), (isa, row)
    assert np.array_equal(pools[0], alone_pools[0]) and np.array_equal(pools[1], alone_pools[1])
