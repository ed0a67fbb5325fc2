"""Random valid K-quant super-blocks (Q2_K .. Q6_K) for the tests: every byte random except the f16 scales, which
are finite and small, so that the values look like a layer's weights. Neither the `gguf` package nor this project
quantizes to K-quants, so tests build their matrices from such blocks and dequantize them for the references."""

from __future__ import annotations

import numpy as np

# bytes per super-block of 256 values, and the offsets of its f16 scales (d, and dmin where there is one)
K_LAYOUT = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)),
            "Q6_K": (210, (208,))}


def random_k_blocks(kind: str, rows: int, k: int, rng: np.random.Generator, scale: float = 2e-3) -> np.ndarray:
    """uint8 [rows, k / 256 * bytes]: rows of random super-blocks of `kind` (k a multiple of 256)."""
    size, halves = K_LAYOUT[kind]
    n = rows * (k // 256)
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for offset in halves:
        d = (np.abs(rng.standard_normal(n)) * scale + scale / 4).astype(np.float16)
        if offset != halves[0]:
            d = (d / 2).astype(np.float16)  # dmin
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)
