// Weight formats: how one output channel's K weights are laid out in a row of bytes.
//
// A weight matrix is [N rows, row_bytes(format, K)] bytes, row n holding the K input weights of output n (the
// layout of GGUF files and of PyTorch's [out, in]). Every format splits a row into blocks of 32 values:
//   F32   K float32                               (4 bytes per value)
//   BF16  K bfloat16                              (2)
//   INT8  one float32 scale, then K int8: w = scale * q, one scale per output channel   (1 + 4 / K)
//   Q8_0  GGUF blocks {half d; int8 q[32]}: w = d * q                                    (34 / 32)
//   Q4_0  GGUF blocks {half d; uint8 q[16]}: w = d * (nibble - 8)                        (18 / 32)
//   Q4_1  GGUF blocks {half d, m; uint8 q[16]}: w = d * nibble + m                       (20 / 32)
// In the 4-bit blocks byte j holds value j in its low nibble and value j + 16 in its high nibble (GGUF's layout).
// Rows of the block formats hold ceil(K / 32) blocks; a last partial block is padded (its values are multiplied
// by zeros). The numbering is shared with mstriton/kernels/formats.py.
#pragma once

#include <cstdint>

enum Format : int { F32 = 0, BF16 = 1, INT8 = 2, Q8_0 = 3, Q4_0 = 4, Q4_1 = 5, FORMAT_COUNT = 6 };

static inline int64_t blocks_of(int64_t k) { return (k + 31) / 32; }

static inline int64_t row_bytes(int format, int64_t k) {
  switch (format) {
    case F32: return 4 * k;
    case BF16: return 2 * k;
    case INT8: return 4 + k;
    case Q8_0: return 34 * blocks_of(k);
    case Q4_0: return 18 * blocks_of(k);
    case Q4_1: return 20 * blocks_of(k);
    default: return -1;
  }
}
