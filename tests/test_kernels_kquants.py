"""The K-quant weight formats of the CPU kernels (Q4_K, Q5_K, Q6_K: GGUF's super-blocks read as the file stores
them; csrc/formats.h, decode.h, qlinear.h) against numpy, on random valid super-blocks (tests/kquant_blocks.py):
the float32 products and the embedding lookup on every ISA this CPU runs, against the matrix the `gguf` package
dequantizes; the int8-activation products with every integer dot product this CPU runs (the plain C++ fallback
included), against numpy doing the same activation quantization and the integer block products in float64."""

from __future__ import annotations

import numpy as np
import pytest
from kquant_blocks import random_k_blocks

from mstriton import kernels
from mstriton.kernels import activations
from mstriton.kernels.formats import FormatError, K_QUANT_FORMATS, pack, row_bytes, unpack
from mstriton.model import gguf as ours

ISAS = kernels.supported_isas()
# (rows, K, channels): K a multiple of 256; rows 1-3 (registers), 4-32 (decoded buffer / int8 tiles), prefill
SHAPES = [(1, 256, 1), (1, 1536, 37), (2, 512, 9), (3, 256, 16), (5, 768, 11), (17, 256, 8), (33, 512, 13),
          (70, 256, 5)]


@pytest.fixture(params=ISAS)
def isa(request):
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(ISAS[0])


@pytest.fixture(params=activations.INT8_ISAS)
def int8_isa(request):
    name = request.param
    if name not in activations.supported_int8_isas():
        pytest.skip(f"this CPU lacks the {name} integer dot products")
    activations.set_int8_isa(name)
    activations.set_activations("int8")
    yield name
    activations.set_activations("float32")
    kernels.set_isa(kernels.supported_isas()[0])


def relative(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def against_terms(actual, expected, x, dense) -> float:
    """The largest error over the largest sum of |terms| of a product (a sum that cancels stays measurable)."""
    return float(np.abs(actual - expected).max() / max((np.abs(x) @ np.abs(dense).T).max(), 1e-30))


def test_rows_hold_whole_super_blocks_and_are_never_packed_here():
    assert row_bytes("Q4_K", 512) == 288 and row_bytes("Q5_K", 256) == 176 and row_bytes("Q6_K", 1536) == 6 * 210
    with pytest.raises(FormatError, match="super-blocks of 256"):
        row_bytes("Q4_K", 576)
    with pytest.raises(FormatError, match="kept from GGUF files"):
        pack("Q6_K", np.zeros((2, 256), np.float32))


@pytest.mark.parametrize("fmt", K_QUANT_FORMATS)
def test_unpack_is_our_dequantization(fmt):
    from gguf import GGMLQuantizationType
    packed = random_k_blocks(fmt, 3, 512, np.random.default_rng(0))
    np.testing.assert_array_equal(unpack(fmt, packed, 512),
                                  ours.dequantize(packed, GGMLQuantizationType[fmt]))


@pytest.mark.parametrize("fmt", K_QUANT_FORMATS)
def test_float32_products_equal_numpy_on_the_dequantized_matrix(isa, fmt):
    rng = np.random.default_rng(1)
    for m, k, n in SHAPES:
        packed = random_k_blocks(fmt, n, k, rng)
        x = rng.standard_normal((m, k)).astype(np.float32)
        dense = unpack(fmt, packed, k).astype(np.float64)
        got = kernels.linear(fmt, x, packed)
        assert against_terms(got, x.astype(np.float64) @ dense.T, x, dense) < 1e-6, f"{isa} {fmt} m={m} k={k} n={n}"
        norm = rng.standard_normal(k).astype(np.float32)
        residual = rng.standard_normal((m, n)).astype(np.float32)
        got = kernels.linear(fmt, x, packed, pre="rmsnorm", norm=norm, eps=1e-5, residual=residual)
        xn = x.astype(np.float64)
        xn = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-5) * norm
        assert against_terms(got, xn @ dense.T + residual, xn, dense) < 1e-6, f"{isa} {fmt} m={m} (norm, residual)"


@pytest.mark.parametrize("fmt", K_QUANT_FORMATS)
def test_embedding_rows_are_the_dequantized_rows(isa, fmt):
    table = random_k_blocks(fmt, 40, 512, np.random.default_rng(2))
    tokens = np.array([[0, 39, 7], [7, 12, 3]], np.int32)
    np.testing.assert_allclose(kernels.embed(fmt, tokens, table, 512), unpack(fmt, table, 512)[tokens],
                               rtol=1e-6, atol=1e-7)


def k_blocks_reference(fmt: str, packed: np.ndarray):
    """Integer values [N, nb, 32], the two 16-value halves' scales [N, nb, 2] and the min terms [N, nb] of a K-quant
    matrix (w = d_half * value + min), from our numpy decoding of the super-blocks."""
    from gguf import GGMLQuantizationType  # noqa: F401  (the layouts are ours: mstriton/model/gguf.py)
    n = packed.shape[0]
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[fmt]
    blocks = packed.reshape(-1, size)
    values = np.stack([ours.k_values(fmt, blocks, j) for j in range(8)], 1).astype(np.int32)  # [n_super, 8, 32]
    if fmt == "Q6_K":
        values -= 32
        d = ours._f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n_super, 16]
        d = d.reshape(-1, 8, 2)
        minimum = np.zeros(d.shape[:2], np.float32)
    else:
        sc, mn = ours.k_scale_min(blocks[:, 4:16])
        d1 = ours._f16(blocks[:, 0:2]) * sc.astype(np.float32)
        d = np.stack([d1, d1], -1)
        minimum = -(ours._f16(blocks[:, 2:4]) * mn.astype(np.float32))
    return values.reshape(n, -1, 32), d.reshape(n, -1, 2), minimum.reshape(n, -1)


def quantize_reference(x: np.ndarray):
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = np.abs(blocks).max(-1)
    d = amax / np.float32(127)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    q = np.rint(blocks * inverse[..., None].astype(np.float32)).astype(np.int8)
    s = d * q.sum(-1, dtype=np.int32).astype(np.float32)
    return q, d.astype(np.float32), s.astype(np.float32)


def int8_reference(fmt: str, packed: np.ndarray, x: np.ndarray) -> np.ndarray:
    q, dx, sx = quantize_reference(x)
    values, dw, minimum = k_blocks_reference(fmt, packed)
    q = q.reshape(q.shape[0], q.shape[1], 2, 16).astype(np.int64)
    dots = np.einsum("rbhi,cbhi->rcbh", q, values.reshape(*values.shape[:2], 2, 16).astype(np.int64))
    return ((dots * dw[None].astype(np.float64)).sum(-1) * dx[:, None, :].astype(np.float64)
            + minimum[None].astype(np.float64) * sx[:, None, :]).sum(-1)


@pytest.mark.parametrize("fmt", K_QUANT_FORMATS)
def test_int8_products_equal_numpy_with_the_same_quantization(int8_isa, fmt):
    rng = np.random.default_rng(3)
    for m, k, n in SHAPES:
        packed = random_k_blocks(fmt, n, k, rng)
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = kernels.linear(fmt, x, packed)
        assert relative(got, int8_reference(fmt, packed, x)) < 2e-5, f"{int8_isa} {fmt} m={m} k={k} n={n}"
        exact = x.astype(np.float64) @ unpack(fmt, packed, k).T.astype(np.float64)
        assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 2e-2, f"{int8_isa} {fmt} m={m}: float32"


def test_every_int8_isa_gives_the_same_k_quant_products():
    rng = np.random.default_rng(5)
    supported = activations.supported_int8_isas()
    activations.set_activations("int8")
    try:
        for fmt in K_QUANT_FORMATS:
            packed = random_k_blocks(fmt, 21, 512, rng)
            for m in (1, 4, 40):
                x = rng.standard_normal((m, 512)).astype(np.float32)
                results = {}
                for name in supported:
                    activations.set_int8_isa(name)
                    results[name] = kernels.linear(fmt, x, packed)
                for name, y in results.items():
                    assert relative(y, results["generic"]) < 1e-5, f"{name} {fmt} m={m}"
    finally:
        activations.set_activations("float32")
        kernels.set_isa(kernels.supported_isas()[0])
