// Decoding one block of 32 weights of each format (formats.h) into NV float vectors, inside an ISA namespace.
//
// full(row, b, out) decodes block b of a row whose every value is present; partial(row, b, k, out) the last block
// of a row of k values, where fewer than 32 remain (only the unblocked formats F32, BF16 and INT8 have such rows;
// the GGUF formats pad their last block). Dequantization is exact in float32 for every format, so the products
// equal those of the dequantized matrix up to the order of the additions.
#pragma once

#include "formats.h"
#include "vec.h"

namespace MST_NS {

struct DecodeF32 {
  static constexpr int BYTES = 128;  // per block of 32 values
  static inline void full(const uint8_t *row, int64_t b, vf out[NV]) {
    const float *p = reinterpret_cast<const float *>(row) + b * QK;
    for (int j = 0; j < NV; j++) out[j] = load<vf>(p + j * W);
  }
  static inline float scalar(const uint8_t *row, int64_t i) {
    float v;
    std::memcpy(&v, row + 4 * i, 4);
    return v;
  }
};

struct DecodeBF16 {
  static constexpr int BYTES = 64;  // per block of 32 values
  static inline void full(const uint8_t *row, int64_t b, vf out[NV]) {
    const uint8_t *p = row + 2 * b * QK;
    for (int j = 0; j < NV; j++) {
      vu bits = widen_u16(p + 2 * j * W) << 16;  // bfloat16 = top half of a float32
      out[j] = __builtin_bit_cast(vf, bits);
    }
  }
  static inline float scalar(const uint8_t *row, int64_t i) {
    uint16_t h;
    std::memcpy(&h, row + 2 * i, 2);
    uint32_t bits = uint32_t(h) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  }
};

struct DecodeINT8 {
  static constexpr int BYTES = 32;  // per block of 32 values
  static inline void full(const uint8_t *row, int64_t b, vf out[NV]) {
    float scale;
    std::memcpy(&scale, row, 4);
    const uint8_t *p = row + 4 + b * QK;
    for (int j = 0; j < NV; j++) out[j] = to_float(widen_s8(p + j * W)) * scale;
  }
  static inline float scalar(const uint8_t *row, int64_t i) {
    float scale;
    std::memcpy(&scale, row, 4);
    return scale * float(static_cast<int8_t>(row[4 + i]));
  }
};

// The block's half-precision scale(s), broadcast: d (and m, the second half). On AVX-512 one 16-byte load converts
// both and two lane permutes spread them, instead of a scalar convert and a broadcast each (about half of the
// vector uops of a 4-bit block went to its scales).
static inline vf scale_d(const uint8_t *blk) {
#if MST_W == 16
  return _mm512_permutexvar_ps(_mm512_setzero_si512(),
                               _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk))));
#else
  return splat(half_to_float(blk));
#endif
}
static inline void scales_dm(const uint8_t *blk, vf *d, vf *m) {
#if MST_W == 16
  const __m512 both = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)));
  *d = _mm512_permutexvar_ps(_mm512_setzero_si512(), both);
  *m = _mm512_permutexvar_ps(_mm512_set1_epi32(1), both);
#else
  *d = splat(half_to_float(blk));
  *m = splat(half_to_float(blk + 2));
#endif
}

struct DecodeQ8_0 {
  static constexpr int BYTES = 34;  // per block of 32 values
  static inline void full(const uint8_t *row, int64_t b, vf out[NV]) {
    const uint8_t *blk = row + 34 * b;
    const vf d = scale_d(blk);
    for (int j = 0; j < NV; j++) out[j] = to_float(widen_s8(blk + 2 + j * W)) * d;
  }
};

// The nibbles of values e .. e+W-1 of a 4-bit block (W divides 16, so a vector never straddles the two halves).
static inline vi nibbles(const uint8_t *qs, int e) {
  return e < 16 ? (widen_u8(qs + e) & 15) : (widen_u8(qs + e - 16) >> 4);
}

struct DecodeQ4_0 {
  static constexpr int BYTES = 18;  // per block of 32 values
  static inline void full(const uint8_t *row, int64_t b, vf out[NV]) {
    const uint8_t *blk = row + 18 * b;
    const vf d = scale_d(blk);
    for (int j = 0; j < NV; j++) out[j] = to_float(nibbles(blk + 2, j * W) - 8) * d;
  }
};

struct DecodeQ4_1 {
  static constexpr int BYTES = 20;  // per block of 32 values
  static inline void full(const uint8_t *row, int64_t b, vf out[NV]) {
    const uint8_t *blk = row + 20 * b;
    vf d, m;
    scales_dm(blk, &d, &m);
    for (int j = 0; j < NV; j++) out[j] = to_float(nibbles(blk + 4, j * W)) * d + m;
  }
};

// ---- K-quants (formats.h): block b of a row is sub-block b % 8 of super-block b / 8 -------------------------

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the super-block's 12 bytes of scales.
static inline void k_scale_min(const uint8_t *sc, int j, int *scale, int *min) {
  if (j < 4) {
    *scale = sc[j] & 63;
    *min = sc[j + 4] & 63;
  } else {
    *scale = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
    *min = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  }
}

// Q4_K and Q5_K (FIVE): w = (d sc) q - (dmin m), q the nibble of qs[32 (j / 2) + i] (low for even j) and, for Q5_K,
// bit j of qh[i] as bit 4.
template <bool FIVE>
struct DecodeQ45_K {
  static constexpr int SUPER = FIVE ? 176 : 144;
  static inline void full(const uint8_t *row, int64_t b, vf out[NV]) {
    const uint8_t *s = row + SUPER * (b >> 3);
    const int j = int(b & 7);
    int sc, m;
    k_scale_min(s + 4, j, &sc, &m);
    const vf d = splat(half_to_float(s) * float(sc)), min = splat(-(half_to_float(s + 2) * float(m)));
    const uint8_t *qs = s + (FIVE ? 48 : 16) + 32 * (j >> 1);
    const int shift = 4 * (j & 1);
    for (int e = 0; e < NV; e++) {
      vi q = (widen_u8(qs + e * W) >> shift) & 15;
      if constexpr (FIVE) q |= ((widen_u8(s + 16 + e * W) >> j) & 1) << 4;
      out[e] = to_float(q) * d + min;  // ggml's order: the product rounded, then the min subtracted
    }
  }
};
using DecodeQ4_K = DecodeQ45_K<false>;
using DecodeQ5_K = DecodeQ45_K<true>;

// Q6_K: w = (d sc) (q - 32) with one int8 sc per 16 values; sub-block j = 4 h + i: the nibble i / 2 of
// ql[64 h + 32 (i % 2) + l], bits 2 i of qh[32 h + l] as bits 4-5.
struct DecodeQ6_K {
  static constexpr int SUPER = 210;
  static inline void full(const uint8_t *row, int64_t b, vf out[NV]) {
    const uint8_t *s = row + SUPER * (b >> 3);
    const int j = int(b & 7), h = j >> 2, i = j & 3;
    const float d = half_to_float(s + 208);
    const int8_t *sc = reinterpret_cast<const int8_t *>(s + 192) + 2 * j;
    const vf d0 = splat(d * float(sc[0])), d1 = splat(d * float(sc[1]));
    const uint8_t *ql = s + 64 * h + 32 * (i & 1), *qh = s + 128 + 32 * h;
    const int lshift = 4 * (i >> 1), hshift = 2 * i;
    for (int e = 0; e < NV; e++) {  // W divides 16: a vector lies in one half of the sub-block
      const vi q = ((widen_u8(ql + e * W) >> lshift) & 15) | (((widen_u8(qh + e * W) >> hshift) & 3) << 4);
      out[e] = to_float(q - 32) * (e * W < 16 ? d0 : d1);
    }
  }
};

// A block format interleaved by 8 channels (formats.h): block b of channel c gathered into its plain GGUF block,
// then decoded as that. (The float32 products and embedding lookups read these matrices so; the int8 products,
// which they are made for, read the groups directly.)
template <class D, int FORMAT>
struct X8 {
  static constexpr int BYTES = D::BYTES;
  static inline void channel(const uint8_t *w, int64_t rb, int64_t c, int64_t b, vf out[NV]) {
    alignas(64) uint8_t block[64];
    gather_block(FORMAT, w, rb, c, b, block);
    D::full(block, 0, out);
  }
};

// Block b of channel c of matrix w (rows of rb bytes) of k values, zero past k. The blocked formats always hold
// whole blocks; the others have a scalar path for their last, partial block.
template <class D>
static inline void decode_block(const uint8_t *w, int64_t rb, int64_t c, int64_t b, int64_t k, vf out[NV]) {
  if constexpr (requires { D::channel(w, rb, c, b, out); }) {
    return D::channel(w, rb, c, b, out);
  } else {
    const uint8_t *row = w + c * rb;
    if constexpr (requires { D::scalar(row, 0); }) {
      if ((b + 1) * QK > k) {
        alignas(64) float tmp[QK] = {};
        for (int64_t i = b * QK; i < k; i++) tmp[i - b * QK] = D::scalar(row, i);
        for (int j = 0; j < NV; j++) out[j] = load<vf>(tmp + j * W);
        return;
      }
    }
    D::full(row, b, out);
  }
}

}  // namespace MST_NS
