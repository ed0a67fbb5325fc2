"""Weight formats of the CPU kernels: packing a float32 matrix into rows of bytes, and the numpy reference
that unpacks them (``csrc/formats.h`` has the byte layouts; the numbering below is shared with it).

Every packed matrix is uint8 [N, row_bytes(format, K)], row n holding output channel n's K weights, as GGUF files
and PyTorch's [out, in] store them. The GGUF block formats are quantized and dequantized by the `gguf` package
(llama.cpp's own Python reference); ours (BF16, INT8) here.
"""

from __future__ import annotations

import numpy as np

# name -> the number the C++ side uses (csrc/formats.h)
FORMATS = {"F32": 0, "BF16": 1, "INT8": 2, "Q8_0": 3, "Q4_0": 4, "Q4_1": 5}
GGUF_BLOCK_FORMATS = ("Q8_0", "Q4_0", "Q4_1")
BLOCK = 32
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


class FormatError(ValueError):
    pass


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FormatError(f"weight format must be one of {list(FORMATS)}, got {fmt!r}")
    return fmt


def blocks_of(k: int) -> int:
    return -(-k // BLOCK)


def row_bytes(fmt: str, k: int) -> int:
    check_format(fmt)
    if fmt == "F32":
        return 4 * k
    if fmt == "BF16":
        return 2 * k
    if fmt == "INT8":
        return 4 + k
    return _BLOCK_BYTES[fmt] * blocks_of(k)


def values_per_row(fmt: str, nbytes: int) -> int:
    """K of a packed row of `nbytes` (for the block formats: whole blocks, K a multiple of 32)."""
    check_format(fmt)
    if fmt == "F32":
        return nbytes // 4
    if fmt == "BF16":
        return nbytes // 2
    if fmt == "INT8":
        return nbytes - 4
    return nbytes // _BLOCK_BYTES[fmt] * BLOCK


def _gguf_type(fmt: str):
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType[fmt]


def _padded(w: np.ndarray) -> np.ndarray:
    k = w.shape[1]
    if k % BLOCK == 0:
        return w
    return np.pad(w, ((0, 0), (0, blocks_of(k) * BLOCK - k)))


def round_bf16(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even, as torch's .to(torch.bfloat16) does."""
    bits = np.ascontiguousarray(w, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def pack(fmt: str, w: np.ndarray) -> np.ndarray:
    """A float32 [N, K] matrix (output channels as rows) in format `fmt`: uint8 [N, row_bytes(fmt, K)]."""
    check_format(fmt)
    w = np.ascontiguousarray(w, np.float32)
    if w.ndim != 2:
        raise FormatError(f"a weight matrix must be 2-D [out, in], got shape {w.shape}")
    n, k = w.shape
    if fmt == "F32":
        return w.view(np.uint8).reshape(n, 4 * k).copy()
    if fmt == "BF16":
        return round_bf16(w).view(np.uint8).reshape(n, 2 * k)
    if fmt == "INT8":
        # Symmetric, one scale per output channel: the largest magnitude maps to 127.
        scale = np.abs(w).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        return np.concatenate([scale[:, None].view(np.uint8), q.view(np.uint8)], axis=1)
    from gguf.quants import quantize
    return np.ascontiguousarray(quantize(_padded(w), _gguf_type(fmt)), np.uint8).reshape(n, row_bytes(fmt, k))


def unpack(fmt: str, packed: np.ndarray, k: int) -> np.ndarray:
    """The float32 [N, K] matrix a packed one holds (the reference the kernels are tested against)."""
    check_format(fmt)
    packed = np.ascontiguousarray(packed, np.uint8)
    n = packed.shape[0]
    if packed.shape[1] != row_bytes(fmt, k):
        raise FormatError(f"{fmt} rows of {k} values take {row_bytes(fmt, k)} bytes, got {packed.shape[1]}")
    if fmt == "F32":
        return packed.view(np.float32).reshape(n, k).copy()
    if fmt == "BF16":
        return (packed.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(n, k)
    if fmt == "INT8":
        scale = packed[:, :4].copy().view(np.float32)
        return packed[:, 4:].view(np.int8).astype(np.float32) * scale
    from gguf.quants import dequantize
    return np.asarray(dequantize(packed, _gguf_type(fmt)), np.float32).reshape(n, -1)[:, :k]
