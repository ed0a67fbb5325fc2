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
//
// The same three block formats interleaved by 8 channels (Q8_0X8, Q4_0X8, Q4_1X8): the same bytes, the same
// matrix size, rows regrouped so that the int8 products read each 8-channel group as the vectors they multiply
// (qlinear.h) instead of transposing 8 rows on every call. N is a multiple of 8; rows 8g .. 8g + 7 (8 rb bytes)
// hold group g as its blocks in order, block b of the group being
//   the 8 channels' d (8 halves), [Q4_1: their m (8 halves)], then the values as vectors of 32 bytes, vector i
//   holding bytes 4i .. 4i+3 of channel c's values (Q8_0: its int8 q; the 4-bit formats: its 16 bytes of nibbles)
//   at bytes 4c .. 4c+3: 8 vectors for Q8_0, 4 for the 4-bit formats.
// (8 * 34, 8 * 18 and 8 * 20 bytes: the 8 blocks of the rows, reordered.)
//
// GGUF's K-quants, as the file stores them: super-blocks of 256 values (K a multiple of 256), each read by the
// kernels as 8 blocks of 32 values (block b of a row: sub-block b % 8 of super-block b / 8):
//   Q4_K  {half d, dmin; uint8 scales[12]; uint8 qs[128]}            w = (d sc) q - (dmin m)       (144 / 256)
//   Q5_K  {half d, dmin; uint8 scales[12]; uint8 qh[32]; qs[128]}    the same with a 5th bit        (176 / 256)
//   Q6_K  {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}      w = (d sc) (q - 32), 16 values  (210 / 256)
// (mstriton/model/gguf.py has where each value's bits and each sub-block's 6-bit scale and min are; decode.h and
// qlinear.h read them with the same shifts and masks.) The scale products d sc and dmin m are one float32
// product each, as ggml computes them, so a decoded block equals ggml's dequantization.
#pragma once

#include <cstdint>
#include <cstring>

enum Format : int {
  F32 = 0, BF16 = 1, INT8 = 2, Q8_0 = 3, Q4_0 = 4, Q4_1 = 5, Q8_0X8 = 6, Q4_0X8 = 7, Q4_1X8 = 8,
  Q4_K = 9, Q5_K = 10, Q6_K = 11, FORMAT_COUNT = 12
};

static inline bool k_quant(int format) { return format >= Q4_K && format <= Q6_K; }
// Bytes of one K-quant super-block of 256 values.
static inline int64_t super_bytes(int format) { return format == Q4_K ? 144 : format == Q5_K ? 176 : 210; }

static inline bool interleaved(int format) { return format >= Q8_0X8 && format <= Q4_1X8; }
// Whether a matrix of n rows can be in this format: an interleaved one holds whole groups of 8 rows.
static inline bool whole_groups(int format, int64_t n) { return !interleaved(format) || n % 8 == 0; }
// The block format an interleaved one regroups (itself for the others).
static inline int base_format(int format) { return interleaved(format) ? format - Q8_0X8 + Q8_0 : format; }

static inline int64_t blocks_of(int64_t k) { return (k + 31) / 32; }

static inline int64_t row_bytes(int format, int64_t k) {
  switch (base_format(format)) {
    case F32: return 4 * k;
    case BF16: return 2 * k;
    case INT8: return 4 + k;
    case Q8_0: return 34 * blocks_of(k);
    case Q4_0: return 18 * blocks_of(k);
    case Q4_1: return 20 * blocks_of(k);
    case Q4_K: case Q5_K: case Q6_K: return k % 256 ? -1 : super_bytes(format) * (k / 256);
    default: return -1;
  }
}

// Block b of channel c of an interleaved matrix (rows of rb bytes) as its format's plain GGUF block (bytes bytes:
// 34, 18 or 20): the portable way to read one channel (embedding lookups, the float32 products, the fallback).
static inline void gather_block(int format, const uint8_t *w, int64_t rb, int64_t c, int64_t b, uint8_t *out) {
  const int base = base_format(format);
  const int64_t bytes = row_bytes(base, 32);
  const uint8_t *group = w + (c / 8) * 8 * rb + b * 8 * bytes;
  const int lane = int(c % 8);
  std::memcpy(out, group + 2 * lane, 2);  // d
  int head = 2, values = 16;              // bytes of the block before its values; of the group before its vectors
  if (base == Q4_1) {
    std::memcpy(out + 2, group + 16 + 2 * lane, 2);  // m
    head = 4;
    values = 32;
  }
  const int vectors = base == Q8_0 ? 8 : 4;
  for (int i = 0; i < vectors; i++) std::memcpy(out + head + 4 * i, group + values + 32 * i + 4 * lane, 4);
}
