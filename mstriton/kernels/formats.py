"""Weight formats of the CPU kernels: packing a float32 matrix into rows of bytes, and the numpy reference
that unpacks them (``csrc/formats.h`` has the byte layouts; the numbering below is shared with it).

Every packed matrix is uint8 [N, row_bytes(format, K)], row n holding output channel n's K weights, as GGUF files
and PyTorch's [out, in] store them. The GGUF block formats are quantized and dequantized by the `gguf` package
(llama.cpp's own Python reference); ours (BF16, INT8) here.

Q8_0X8, Q4_0X8 and Q4_1X8 hold the same blocks as Q8_0, Q4_0 and Q4_1, regrouped by 8 output channels so that the
int8 products read each group as the vectors they multiply (csrc/formats.h has the layout): `interleave` and
`deinterleave` move between the two, byte for byte.

Q4_K, Q5_K and Q6_K are GGUF's K-quant super-blocks as the file stores them (csrc/formats.h); they are kept from
files, never packed here (`pack` refuses them), and unpacked by the `gguf` package like the other block formats.
"""

from __future__ import annotations

import numpy as np

# name -> the number the C++ side uses (csrc/formats.h)
FORMATS = {"F32": 0, "BF16": 1, "INT8": 2, "Q8_0": 3, "Q4_0": 4, "Q4_1": 5, "Q8_0X8": 6, "Q4_0X8": 7, "Q4_1X8": 8,
           "Q4_K": 9, "Q5_K": 10, "Q6_K": 11}
GGUF_BLOCK_FORMATS = ("Q8_0", "Q4_0", "Q4_1")
# GGUF's K-quants, kept as the file stores them (super-blocks of 256 values: K a multiple of 256). No quantizer:
# these matrices come from files (the `gguf` package quantizes none of them either).
K_QUANT_FORMATS = ("Q4_K", "Q5_K", "Q6_K")
SUPER_BLOCK = 256
_SUPER_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
INTERLEAVED = {"Q8_0X8": "Q8_0", "Q4_0X8": "Q4_0", "Q4_1X8": "Q4_1"}  # interleaved format -> the blocks it regroups
GROUP = 8  # channels per interleaved group
BLOCK = 32
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
_SCALE_BYTES = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}  # d (and m) before a block's values


class FormatError(ValueError):
    pass


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FormatError(f"weight format must be one of {list(FORMATS)}, got {fmt!r}")
    return fmt


def blocks_of(k: int) -> int:
    return -(-k // BLOCK)


def base_format(fmt: str) -> str:
    """The block format an interleaved one regroups; any other format itself."""
    return INTERLEAVED.get(check_format(fmt), fmt)


def interleaved_format(fmt: str) -> str | None:
    """Q8_0 -> Q8_0X8, ...; None for the formats that have no interleaved form."""
    return {base: x8 for x8, base in INTERLEAVED.items()}.get(fmt)


def row_bytes(fmt: str, k: int) -> int:
    fmt = base_format(fmt)
    if fmt == "F32":
        return 4 * k
    if fmt == "BF16":
        return 2 * k
    if fmt == "INT8":
        return 4 + k
    if fmt in _SUPER_BYTES:
        if k % SUPER_BLOCK:
            raise FormatError(f"{fmt} rows hold whole super-blocks of {SUPER_BLOCK} values, got {k} values")
        return _SUPER_BYTES[fmt] * (k // SUPER_BLOCK)
    return _BLOCK_BYTES[fmt] * blocks_of(k)


def values_per_row(fmt: str, nbytes: int) -> int:
    """K of a packed row of `nbytes` (for the block formats: whole blocks, K a multiple of 32)."""
    fmt = base_format(fmt)
    if fmt == "F32":
        return nbytes // 4
    if fmt == "BF16":
        return nbytes // 2
    if fmt == "INT8":
        return nbytes - 4
    if fmt in _SUPER_BYTES:
        return nbytes // _SUPER_BYTES[fmt] * SUPER_BLOCK
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


def _group_view(base: str, rows: np.ndarray) -> tuple[np.ndarray, int]:
    n, rb = rows.shape
    if n % GROUP:
        raise FormatError(f"an interleaved matrix needs a multiple of {GROUP} rows (output channels), got {n}")
    return rows.reshape(n // GROUP, GROUP, rb // _BLOCK_BYTES[base], _BLOCK_BYTES[base]), rb


def interleave(base: str, rows: np.ndarray) -> np.ndarray:
    """Plain rows of block format `base` [N, rb] -> the same bytes interleaved by 8 channels [N, rb]."""
    blocks, rb = _group_view(base, np.ascontiguousarray(rows, np.uint8))
    g, _, nb, _ = blocks.shape
    head = _SCALE_BYTES[base]
    # per (group, block): each scale of the 8 channels side by side, then vector i = 4-byte piece i of every channel
    scales = [blocks[..., s:s + 2].transpose(0, 2, 1, 3).reshape(g, nb, 2 * GROUP) for s in range(0, head, 2)]
    values = blocks[..., head:].reshape(g, GROUP, nb, -1, 4).transpose(0, 2, 3, 1, 4).reshape(g, nb, -1)
    return np.concatenate(scales + [values], axis=2).reshape(g * GROUP, rb)


def deinterleave(base: str, packed: np.ndarray) -> np.ndarray:
    """The inverse of `interleave`."""
    grouped, rb = _group_view(base, np.ascontiguousarray(packed, np.uint8))
    g, _, nb, nbytes = grouped.shape
    flat = grouped.reshape(g, nb, GROUP * nbytes)  # one group's block b: 8 blocks' bytes, reordered
    head = _SCALE_BYTES[base]
    scales = [flat[:, :, 2 * GROUP * j:2 * GROUP * (j + 1)].reshape(g, nb, GROUP, 2) for j in range(head // 2)]
    values = flat[:, :, GROUP * head:].reshape(g, nb, -1, GROUP, 4).transpose(0, 1, 3, 2, 4).reshape(g, nb, GROUP, -1)
    blocks = np.concatenate(scales + [values], axis=3)  # [g, nb, 8, bytes]
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3)).reshape(g * GROUP, rb)


def pack(fmt: str, w: np.ndarray) -> np.ndarray:
    """A float32 [N, K] matrix (output channels as rows) in format `fmt`: uint8 [N, row_bytes(fmt, K)]."""
    check_format(fmt)
    if fmt in INTERLEAVED:
        return interleave(INTERLEAVED[fmt], pack(INTERLEAVED[fmt], w))
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
    if fmt in K_QUANT_FORMATS:
        raise FormatError(f"{fmt} matrices are kept from GGUF files as they are; there is no quantizer to {fmt} here")
    from gguf.quants import quantize
    return np.ascontiguousarray(quantize(_padded(w), _gguf_type(fmt)), np.uint8).reshape(n, row_bytes(fmt, k))


def unpack(fmt: str, packed: np.ndarray, k: int) -> np.ndarray:
    """The float32 [N, K] matrix a packed one holds (the reference the kernels are tested against)."""
    check_format(fmt)
    if fmt in INTERLEAVED:
        return unpack(INTERLEAVED[fmt], deinterleave(INTERLEAVED[fmt], packed), k)
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
