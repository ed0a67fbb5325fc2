// Weight products with int8 activations (issue 27): the products of Q8_0, Q4_0 and Q4_1 weights, and of the
// K-quants Q4_K, Q5_K and Q6_K (decode steps and prefill alike) as integer dot products of 32-value blocks.
//
// Each row of pre(x) (prepare_rows: x, RMSNorm(x) * g or SwiGLU, as the float32 path computes it) is quantized once
// per call into blocks of 32 int8 with one float32 scale per block, d_x = max|x| / 127, q_x = rint(x / d_x), and
// each block's s_x = d_x * sum(q_x). A weight block is d * w_i (+ min) with integer w_i (Q8_0: int8, min 0; Q4_0:
// the nibble, min -8 d; Q4_1: the nibble, min m), so a block's share of a product is
//     sum_i (d w_i + min) (d_x q_i) = d d_x sum_i w_i q_i + min s_x
// with the sum of products in integers. The float32-activation path (linear.h) stays the exact one; this one is
// chosen by MSTRITON_KERNEL_ACTIVATIONS=int8 (entry.cpp), which keeps it for the other formats.
//
// Integer dot products of a block (32 bytes, one 256-bit vector), per ISA:
// - AVX2: vpmaddubsw (u8 x s8 -> s16 pairs) then vpmaddwd with ones (-> s32 lanes). The 4-bit weights are unsigned
//   nibbles (0..15: pairs stay far from the s16 bound); for Q8_0's signed weights the sign moves onto the
//   activation: |w| x sign(q, w) (pairs at most 2 * 128 * 127 < 2^15).
// - VNNI: vpdpbusd does both steps in one instruction: AVX512-VNNI (EVEX, on 256-bit vectors, with AVX-512's 32
//   vector registers) in the avx512 object, AVX-VNNI (VEX) in the avx2 object. Written as inline assembly: the
//   objects are built without -mavx512vnni / -mavxvnni, and a target attribute does not reach through the
//   templates into the intrinsic. The CPU is checked at run time before either is called (entry.cpp).
// - generic: plain C++ (the fallback, and the reference the others are tested against beside numpy's).
// The same 256-bit code serves the avx512 object (its EVEX encoding reaches 32 registers: larger tiles there).
//
// Rows share each weight block's load, as in linear.h. Two layouts (qproduct chooses, by format and rows):
// - per channel (Q8_0, up to 3 rows): a block unpacked into one register, multiplied into every row; each lane
//   holds part of one channel's dot (qtile_direct);
// - 8 channels in the 8 lanes (the 4-bit formats, and Q8_0 from 4 rows): a group of 8 channels unpacked once into
//   a small buffer, transposed so that lane c is channel c, then tiles of rows run from it, one accumulator per row
//   for all 8 channels (qtile_lanes).
#pragma once

#include "linear.h"

namespace MST_NS {

// The quantized rows of one call: q [M, kp] int8, d and s [M, nb] float32 (kp = 32 nb).
struct QRows {
  const int8_t *q;
  const float *d, *s;
  int64_t kp, nb;
};

// ---- quantizing the activations -----------------------------------------------------------------------------

static inline void quantize_block(const float *p, int8_t *q, float *d, float *s) {
#if MST_W >= 8
  __m256 v[4];
  for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(p + 8 * j);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  const float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m256 mul = _mm256_set1_ps(inverse);
  __m256i i[4];
  for (int j = 0; j < 4; j++) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], mul));  // nearest, ties to even
  // packs work within 128-bit lanes: the dwords come out as values 0-3 16-19 4-7 20-23 ...; put them in order
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i *>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  *d = scale;
  *s = scale * float(_mm_cvtsi128_si32(t));
#else
  float amax = 0.0f;
  for (int i = 0; i < QK; i++) amax = std::max(amax, std::fabs(p[i]));
  const float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
  int total = 0;
  for (int i = 0; i < QK; i++) {
    q[i] = static_cast<int8_t>(std::nearbyint(p[i] * inverse));  // the default rounding: nearest, ties to even
    total += q[i];
  }
  *d = scale;
  *s = scale * float(total);
#endif
}

// Rows xp [M, kp] (zero-padded to whole blocks) -> q [M, kp], d, s [M, kp / 32].
void quantize_rows(const float *xp, int64_t m, int64_t kp, int8_t *q, float *d, float *s, int threads) {
  const int64_t nb = kp / QK;
  parallel_runs(m > 4 ? threads : 1, m, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
      for (int64_t b = 0; b < nb; b++)
        quantize_block(xp + r * kp + b * QK, q + r * kp + b * QK, d + r * nb + b, s + r * nb + b);
  });
}

// ---- weight blocks: integer values and scales -----------------------------------------------------------------

// BYTES per block; SIGNED: int8 values (else unsigned nibbles); OFFSET: a min term; scales() and values(): the
// block's d, min and integer values (the plain C++ path); min_terms(): the min terms of 8 blocks from their d and
// their second halves (the lanes layout).

struct QBlockQ8_0 {
  static constexpr int BYTES = 34;
  static constexpr bool SIGNED = true, OFFSET = false;
  static inline void scales(const uint8_t *blk, float *d, float *min) {
    *d = half_to_float(blk);
    *min = 0.0f;
  }
  static inline void values(const uint8_t *blk, int8_t out[QK]) { std::memcpy(out, blk + 2, QK); }
#if MST_W >= 8
  // -128 d: the min term of the values + 128 that vpdpbusd takes (unsigned) in the lanes layout
  static inline __m256 min_terms(__m256 d, __m256) { return _mm256_mul_ps(d, _mm256_set1_ps(-128.0f)); }
  // the per-channel products: the values in one register, d broadcast (one conversion: GCC's scalar half ->
  // float took four instructions)
  static inline __m256i vector(const uint8_t *blk) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2));
  }
  static inline __m256 d_vector(const uint8_t *blk) {
    uint16_t bits;
    std::memcpy(&bits, blk, 2);
    return _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
  }
#endif
};

// Byte j of a 4-bit block holds value j (low nibble) and value j + 16 (high nibble).
static inline void nibble_values(const uint8_t *qs, int8_t out[QK]) {
  for (int j = 0; j < 16; j++) {
    out[j] = int8_t(qs[j] & 15);
    out[j + 16] = int8_t(qs[j] >> 4);
  }
}

struct QBlockQ4_0 {
  static constexpr int BYTES = 18;
  static constexpr bool SIGNED = false, OFFSET = true;
  static inline void scales(const uint8_t *blk, float *d, float *min) {
    *d = half_to_float(blk);
    *min = -8.0f * *d;  // d (nibble - 8)
  }
  static inline void values(const uint8_t *blk, int8_t out[QK]) { nibble_values(blk + 2, out); }
#if MST_W >= 8
  static inline __m256 min_terms(__m256 d, __m256) { return _mm256_mul_ps(d, _mm256_set1_ps(-8.0f)); }
#endif
};

struct QBlockQ4_1 {
  static constexpr int BYTES = 20;
  static constexpr bool SIGNED = false, OFFSET = true;
  static inline void scales(const uint8_t *blk, float *d, float *min) {
    *d = half_to_float(blk);
    *min = half_to_float(blk + 2);
  }
  static inline void values(const uint8_t *blk, int8_t out[QK]) { nibble_values(blk + 4, out); }
#if MST_W >= 8
  static inline __m256 min_terms(__m256, __m256 m) { return m; }
#endif
};

#if MST_W >= 8
// ---- integer dot products of 32 bytes: 8 int32 lanes, lane i the sum over bytes 4i .. 4i+3 --------------------

struct DotMaddubs {  // AVX2 (and AVX-512 BW/VL without VNNI)
  static constexpr bool VNNI = false;
  static inline __m256i unsigned_signed(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
  }
};

struct DotVnni {  // vpdpbusd: AVX512-VNNI (EVEX, 256-bit) in the avx512 object, AVX-VNNI (VEX) in the avx2 one
  static constexpr bool VNNI = true;
  // acc + the lane sums of u * s
  static inline __m256i accumulate(__m256i acc, __m256i u, __m256i s) {
#if MST_W == 16
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(s));
#else
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "xm"(s));
#endif
    return acc;
  }
  static inline __m256i unsigned_signed(__m256i u, __m256i s) { return accumulate(_mm256_setzero_si256(), u, s); }
};

// A weight block's values w (as F::vector gives them) times the activations' q. Q8_0's values are at least -128
// (gguf writes -127 .. 127): |w| <= 128 as unsigned.
template <class F, class Dot>
static inline __m256i block_dot(__m256i w, __m256i q) {
  if constexpr (F::SIGNED) return Dot::unsigned_signed(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
  else return Dot::unsigned_signed(w, q);
}

static inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// ---- Q8_0, up to 3 rows: each weight block in a register, used by every row --------------------------------

// MR rows x NC channels of accumulators, each lane a part of one channel's dot. (The loops over rows and channels
// are unrolled, and the call's sizes copied to locals: otherwise GCC kept the accumulators in memory, storing them
// on every iteration, and reloaded the sizes after each store.)
template <class F, class Dot, int MR, int NC>
static void qtile_direct(const LinearArgs &a, const QRows &x, int64_t rb, int64_t c0) {
  static_assert(!F::OFFSET, "the per-channel products have no min term (Q8_0)");
  const int64_t nb = x.nb, kp = x.kp;
  const int8_t *const xq = x.q;
  const float *const xd = x.d;
  const uint8_t *const w0 = a.w + c0 * rb;
  __m256 acc[NC][MR];
#pragma GCC unroll 16
  for (int c = 0; c < NC; c++)
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) acc[c][r] = _mm256_setzero_ps();
  Ahead ahead(a.w, c0, NC, rb, nb);
  for (int64_t b = 0; b < nb; b++) {
    ahead.step();
    __m256 dx[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) dx[r] = _mm256_broadcast_ss(xd + r * nb + b);
#pragma GCC unroll 16
    for (int c = 0; c < NC; c++) {
      const uint8_t *blk = w0 + c * rb + b * F::BYTES;
      const __m256i w = F::vector(blk);
      const __m256 d = F::d_vector(blk);
#pragma GCC unroll 16
      for (int r = 0; r < MR; r++) {
        const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i *>(xq + r * kp + b * QK));
        acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<F, Dot>(w, q)), _mm256_mul_ps(d, dx[r]), acc[c][r]);
      }
    }
  }
  float sums[NC][MR];
#pragma GCC unroll 16
  for (int c = 0; c < NC; c++)
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) sums[c][r] = hsum8(acc[c][r]);
  for (int c = 0; c < NC; c++)
    for (int r = 0; r < MR; r++) a.y[r * a.n + c0 + c] = epilogue(a, r, c0 + c, sums[c][r]);
}

template <class F, class Dot, int MR>
static void qgemv_direct(const LinearArgs &a, const QRows &x) {
  // One FMA per block into each accumulator: 4 of them cover its latency; more channels, more row pointers than
  // the general registers hold (8 channels spilled them: a reload beside each prefetch).
  constexpr int NC = MR == 1 ? 4 : 2;
  const int64_t rb = row_bytes(a.format, a.k), groups = a.n / NC, extra = a.n - groups * NC;
  parallel_runs(a.threads, groups + extra, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      if (i < groups) qtile_direct<F, Dot, MR, NC>(a, x, rb, i * NC);
      else qtile_direct<F, Dot, MR, 1>(a, x, rb, groups * NC + (i - groups));
    }
  });
}

// ---- more rows: 8 channels in the 8 lanes -------------------------------------------------------------------
// Above, each lane holds a part of one channel's dot: every block ends in a conversion, a scale product and an FMA
// per row and channel, and every channel in a horizontal sum. Here a group of 8 channels is unpacked once into a
// buffer where lane c of a vector is channel c: for each block, vector i holds values 4i .. 4i+3 of the 8 channels
// (an 8 x 4-byte transpose). A row's 4-byte group i, broadcast, times vector i gives all 8 channels' partial dots at
// once; the 8 groups summed, one conversion, one scale product (the 8 channels' d times the row's d_x) and one FMA
// serve 8 channels. The 4-bit formats sum the 8 vpmaddubsw results in int16 (each at most 2 * 15 * 127, so 8 of them
// stay below 2^15); Q8_0 takes vpmaddwd after each (pairs up to 2 * 128 * 127). With VNNI, vpdpbusd sums in int32;
// for Q8_0 it needs unsigned weights: w + 128, and the min term -128 d takes the excess back (-128 d s_x).

// The buffer of one group of 8 channels: for each block, 8 vectors of values (256 bytes), the 8 channels' d and
// their min terms (8 floats each).
struct QLanes {
  uint8_t *values;
  float *d, *min;
};

template <class F, class Dot>
static constexpr bool lanes_offset() { return F::OFFSET || (F::SIGNED && Dot::VNNI); }

// 4 x 4 transpose of the dwords within each 128-bit lane: y[c] = (D0 D1 D2 D3 of channel c | of channel c + 4) ->
// g[i] = (Di of channels 0 1 2 3 | of channels 4 5 6 7).
static inline void transpose_lanes(const __m256i y[4], __m256i g[4]) {
  const __m256i t0 = _mm256_unpacklo_epi32(y[0], y[1]), t1 = _mm256_unpackhi_epi32(y[0], y[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(y[2], y[3]), t3 = _mm256_unpackhi_epi32(y[2], y[3]);
  g[0] = _mm256_unpacklo_epi64(t0, t2);
  g[1] = _mm256_unpackhi_epi64(t0, t2);
  g[2] = _mm256_unpacklo_epi64(t1, t3);
  g[3] = _mm256_unpackhi_epi64(t1, t3);
}

// 16 bytes of channel c in the low lane, of channel c + 4 in the high one, for c = 0 .. 3.
static inline void pair_channels(const uint8_t *const blk[8], int offset, __m256i y[4]) {
  for (int c = 0; c < 4; c++)
    y[c] = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk[c] + offset))),
        _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk[c + 4] + offset)), 1);
}

// Unpack blocks b of the group's channels (blk[c]: channel c's block, a zero block past the matrix's last channel).
template <class F, class Dot>
static inline void lanes_block(const uint8_t *const blk[8], int64_t b, const QLanes &p) {
  __m256i y[4], g[4];
  __m256i *out = reinterpret_cast<__m256i *>(p.values + b * 256);
  if constexpr (F::SIGNED) {  // Q8_0: bytes 0-15 are groups 0-3, bytes 16-31 groups 4-7
    for (int half = 0; half < 2; half++) {
      pair_channels(blk, 2 + 16 * half, y);
      transpose_lanes(y, g);
      for (int i = 0; i < 4; i++)
        _mm256_store_si256(out + 4 * half + i, Dot::VNNI ? _mm256_xor_si256(g[i], _mm256_set1_epi8(char(0x80))) : g[i]);
    }
  } else {  // the 16 bytes of nibbles: low nibbles are groups 0-3, high nibbles groups 4-7
    const __m256i mask = _mm256_set1_epi8(15);
    pair_channels(blk, F::BYTES - 16, y);
    transpose_lanes(y, g);
    for (int i = 0; i < 4; i++) {
      _mm256_store_si256(out + i, _mm256_and_si256(g[i], mask));
      _mm256_store_si256(out + 4 + i, _mm256_and_si256(_mm256_srli_epi16(g[i], 4), mask));
    }
  }
  // the 8 channels' d and m (the block's first 4 bytes; Q8_0, Q4_0: d and 2 bytes of values) in one conversion
  uint32_t head[8];
  for (int c = 0; c < 8; c++) std::memcpy(&head[c], blk[c], 4);
  const __m256i halves = _mm256_setr_epi32(head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7]);
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));       // d0 m0 d1 m1 d2 m2 d3 m3
  const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));  // channels 4 .. 7
  auto in_order = [](__m256 v) {  // channels 0 1 4 5 | 2 3 6 7 -> 0 .. 7
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xd8));
  };
  const __m256 d = in_order(_mm256_shuffle_ps(lo, hi, 0x88));
  _mm256_store_ps(p.d + b * 8, d);
  if constexpr (lanes_offset<F, Dot>())
    _mm256_store_ps(p.min + b * 8, F::min_terms(d, in_order(_mm256_shuffle_ps(lo, hi, 0xdd))));
}

// Where a tile reads a group's blocks: the 8 value vectors (as pairs i, i + 4: a 4-bit block's vector i and i + 4
// come from one load, low and high nibbles), the 8 channels' d and their min terms.
// LanesBuffer: unpacked by lanes_block from 8 plain rows, once per call.
struct LanesBuffer {
  QLanes p;
  inline void pair(int64_t b, int i, __m256i *lo, __m256i *hi) const {
    const __m256i *values = reinterpret_cast<const __m256i *>(p.values + b * 256);
    *lo = _mm256_load_si256(values + i);
    *hi = _mm256_load_si256(values + i + 4);
  }
  inline __m256 d(int64_t b) const { return _mm256_load_ps(p.d + b * 8); }
  inline __m256 min(int64_t b, __m256) const { return _mm256_load_ps(p.min + b * 8); }
  inline void prefetch(int64_t) const {}  // in L1: lanes_block prefetched the rows
};

// InterleavedGroup: a group of a matrix interleaved by 8 channels (formats.h), read as it is stored.
template <class F, class Dot>
struct InterleavedGroup {
  const uint8_t *group;  // block 0 of the group
  static constexpr int64_t STRIDE = 8 * F::BYTES;
  static constexpr int VALUES = F::BYTES == 20 ? 32 : 16;  // d (and Q4_1's m) of the 8 channels come first
  // The cache lines of block b + MST_AHEAD / STRIDE: a group is one stream, but at one row a tile consumes it
  // faster than the hardware prefetcher alone brings it in.
  inline void prefetch(int64_t b) const {
    const char *p = reinterpret_cast<const char *>(group + b * STRIDE + MST_AHEAD);
    for (int64_t o = 0; o < STRIDE; o += 64) __builtin_prefetch(p + o);
  }
  inline void pair(int64_t b, int i, __m256i *lo, __m256i *hi) const {
    const __m256i *v = reinterpret_cast<const __m256i *>(group + b * STRIDE + VALUES);
    if constexpr (F::SIGNED) {
      *lo = _mm256_loadu_si256(v + i);
      *hi = _mm256_loadu_si256(v + i + 4);
      if constexpr (Dot::VNNI) {  // vpdpbusd takes the weights unsigned: w + 128 (min_terms takes it back)
        *lo = _mm256_xor_si256(*lo, _mm256_set1_epi8(char(0x80)));
        *hi = _mm256_xor_si256(*hi, _mm256_set1_epi8(char(0x80)));
      }
    } else {
      const __m256i raw = _mm256_loadu_si256(v + i), mask = _mm256_set1_epi8(15);
      *lo = _mm256_and_si256(raw, mask);
      *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    }
  }
  inline __m256 d(int64_t b) const {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(group + b * STRIDE)));
  }
  inline __m256 min(int64_t b, __m256 d) const {
    if constexpr (F::BYTES == 20)
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(group + b * STRIDE + 16)));
    else return F::min_terms(d, d);
  }
};

template <class F, class Dot, int RT, class Src>
static inline void qtile_lanes(const LinearArgs &a, const QRows &x, const Src &src, int64_t r0, int64_t c0,
                               int channels) {
  const int64_t nb = x.nb, kp = x.kp;
  const int8_t *const xq = x.q + r0 * kp;
  const float *const xd = x.d + r0 * nb, *const xs = x.s + r0 * nb;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT];
#pragma GCC unroll 16
  for (int r = 0; r < RT; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    src.prefetch(b);
    __m256i sum[RT];
#pragma GCC unroll 8
    for (int i = 0; i < 4; i++) {
      __m256i w[2];
      src.pair(b, i, &w[0], &w[1]);
#pragma GCC unroll 2
      for (int h = 0; h < 2; h++) {
#pragma GCC unroll 16
        for (int r = 0; r < RT; r++) {
          int32_t group;
          std::memcpy(&group, xq + r * kp + b * QK + 4 * (i + 4 * h), 4);
          const __m256i q = _mm256_set1_epi32(group);
          const bool first = i == 0 && h == 0;
          if constexpr (Dot::VNNI) {
            sum[r] = first ? Dot::unsigned_signed(w[h], q) : Dot::accumulate(sum[r], w[h], q);
          } else if constexpr (F::SIGNED) {
            const __m256i t =
                _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w[h], w[h]), _mm256_sign_epi8(q, w[h])), ones);
            sum[r] = first ? t : _mm256_add_epi32(sum[r], t);
          } else {
            const __m256i t = _mm256_maddubs_epi16(w[h], q);
            sum[r] = first ? t : _mm256_add_epi16(sum[r], t);
          }
          // Keep each row's sum a chain: GCC otherwise reassociates the 8 additions into a tree, whose 8 products
          // per row wait on the stack (seen in the compiled loop: a spill beside each vpmaddubsw).
          asm("" : "+v"(sum[r]));
        }
      }
    }
    const __m256 d = src.d(b);
    __m256 min = _mm256_setzero_ps();
    if constexpr (lanes_offset<F, Dot>()) min = src.min(b, d);
#pragma GCC unroll 16
    for (int r = 0; r < RT; r++) {
      const __m256i s32 = (!Dot::VNNI && !F::SIGNED) ? _mm256_madd_epi16(sum[r], ones) : sum[r];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(d, _mm256_broadcast_ss(xd + r * nb + b)), acc[r]);
      if constexpr (lanes_offset<F, Dot>()) acc[r] = _mm256_fmadd_ps(min, _mm256_broadcast_ss(xs + r * nb + b), acc[r]);
    }
  }
  alignas(32) float out[RT][8];
#pragma GCC unroll 16
  for (int r = 0; r < RT; r++) _mm256_store_ps(out[r], acc[r]);  // (unrolled: acc stays in registers)
  for (int r = 0; r < RT; r++)
    for (int c = 0; c < channels; c++) a.y[(r0 + r) * a.n + c0 + c] = epilogue(a, r0 + r, c0 + c, out[r][c]);
}

template <class F, class Dot, int R, class Src>
static inline void qtile_lanes_rows(const LinearArgs &a, const QRows &x, const Src &src, int64_t r0, int rows,
                                    int64_t c0, int channels) {
  if constexpr (R > 0) {
    if (rows == R) return qtile_lanes<F, Dot, R>(a, x, src, r0, c0, channels);
    return qtile_lanes_rows<F, Dot, R - 1>(a, x, src, r0, rows, c0, channels);
  }
}

// Rows per tile: RT accumulators and RT running sums, a weight vector, a broadcast and temporaries within the
// vector registers (AVX2: 16; AVX-512 with VL: 32).
constexpr int QLANE_RT = W == 16 ? 8 : 4;

// All rows of the call for one group of channels: tiles of QLANE_RT rows, then the rows left.
template <class F, class Dot, class Src>
static inline void qtile_lanes_all(const LinearArgs &a, const QRows &x, const Src &src, int64_t c0, int channels) {
  int64_t r0 = 0;
  for (; r0 + QLANE_RT <= a.m; r0 += QLANE_RT) qtile_lanes<F, Dot, QLANE_RT>(a, x, src, r0, c0, channels);
  if (r0 < a.m) qtile_lanes_rows<F, Dot, QLANE_RT - 1>(a, x, src, r0, int(a.m - r0), c0, channels);
}

template <class F, class Dot>
static void qgemv_lanes(const LinearArgs &a, const QRows &x) {
  const int64_t rb = row_bytes(a.format, a.k), groups = (a.n + 7) / 8;
  alignas(64) static const uint8_t zero_block[64] = {};
  parallel_runs(a.threads, groups, [&](int64_t g0, int64_t g1) {
    uint8_t *buffer = static_cast<uint8_t *>(mst_scratch(1, x.nb * (256 + 2 * 32)));
    const QLanes p{buffer, reinterpret_cast<float *>(buffer + x.nb * 256),
                   reinterpret_cast<float *>(buffer + x.nb * (256 + 32))};
    for (int64_t g = g0; g < g1; g++) {
      const int64_t c0 = g * 8;
      const int channels = int(std::min<int64_t>(8, a.n - c0));
      const uint8_t *blk[8];
      int64_t step[8];
      for (int c = 0; c < 8; c++) {
        blk[c] = c < channels ? a.w + (c0 + c) * rb : zero_block;
        step[c] = c < channels ? F::BYTES : 0;
      }
      Ahead ahead(a.w, c0, channels, rb, x.nb);
      for (int64_t b = 0; b < x.nb; b++) {
        ahead.step();
        lanes_block<F, Dot>(blk, b, p);
        for (int c = 0; c < 8; c++) blk[c] += step[c];
      }
      qtile_lanes_all<F, Dot>(a, x, LanesBuffer{p}, c0, channels);
    }
  });
}

// A matrix interleaved by 8 channels: each group read where it is stored, nothing unpacked (one contiguous stream
// of 8 rb bytes per group, which the hardware prefetchers follow; InterleavedGroup::prefetch runs ahead of it).
template <class F, class Dot>
static void qgemv_interleaved(const LinearArgs &a, const QRows &x) {
  const int64_t rb = row_bytes(a.format, a.k), groups = a.n / 8;
  parallel_runs(a.threads, groups, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
      const int64_t c0 = g * 8;
      qtile_lanes_all<F, Dot>(a, x, InterleavedGroup<F, Dot>{a.w + c0 * rb}, c0, 8);
    }
  });
}

// Q8_0's signed values cost the lanes a sign per row and 4-byte group (vpsignb): for up to 3 rows the
// per-channel products are faster; the 4-bit formats take the lanes from one row on (measured on AVX2: 576 x 256
// products in L2, one thread; Q4_1 at 1, 2, 4, 16 rows: 1.56, 1.06, 0.79, 0.61 ns per row and block in lanes, 1.73,
// 1.37, 1.38, 1.16 per channel; Q8_0 at 1, 3, 4 rows: 2.03, 1.12, 0.97 in lanes, 1.31, 1.03, 1.24 per channel).
template <class F, class Dot>
static void qproduct(const LinearArgs &a, const QRows &x) {
  if (interleaved(a.format)) return qgemv_interleaved<F, Dot>(a, x);
  if constexpr (F::SIGNED) {
    if (a.m == 1) return qgemv_direct<F, Dot, 1>(a, x);
    if (a.m == 2) return qgemv_direct<F, Dot, 2>(a, x);
    if (a.m == 3) return qgemv_direct<F, Dot, 3>(a, x);
  }
  qgemv_lanes<F, Dot>(a, x);
}

#else  // MST_W == 4: the plain C++ fallback

struct DotPlain {};

template <class F, class Dot>
static void qproduct(const LinearArgs &a, const QRows &x) {
  const int64_t rb = row_bytes(a.format, a.k);
  parallel_runs(a.threads, a.n, [&](int64_t c0, int64_t c1) {
    alignas(32) int8_t w[QK];
    float acc[GEMV_MAX_ROWS];
    for (int64_t c = c0; c < c1; c++) {
      for (int64_t r0 = 0; r0 < a.m; r0 += GEMV_MAX_ROWS) {  // rows in chunks: prefill has any number
        const int64_t rows = std::min<int64_t>(GEMV_MAX_ROWS, a.m - r0);
        for (int64_t r = 0; r < rows; r++) acc[r] = 0.0f;
        for (int64_t b = 0; b < x.nb; b++) {
          alignas(8) uint8_t gathered[64];
          const uint8_t *blk = a.w + c * rb + b * F::BYTES;
          if (interleaved(a.format)) {
            gather_block(a.format, a.w, rb, c, b, gathered);
            blk = gathered;
          }
          F::values(blk, w);
          float dw, mw;
          F::scales(blk, &dw, &mw);
          for (int64_t r = 0; r < rows; r++) {
            const int8_t *q = x.q + (r0 + r) * x.kp + b * QK;
            int32_t s = 0;
            for (int i = 0; i < QK; i++) s += int32_t(w[i]) * int32_t(q[i]);
            acc[r] += dw * x.d[(r0 + r) * x.nb + b] * float(s) + mw * x.s[(r0 + r) * x.nb + b];
          }
        }
        for (int64_t r = 0; r < rows; r++) a.y[(r0 + r) * a.n + c] = epilogue(a, r0 + r, c, acc[r]);
      }
    }
  });
}

#endif

// ---- K-quants (Q4_K, Q5_K, Q6_K), read as the file stores them ----------------------------------------------
// Block b of a row is sub-block b % 8 of super-block b / 8 (formats.h), 32 values from one run of 32 bytes, shifted
// and masked: its share of a product is d_x (d_lo sum_{i<16} w_i q_i + d_hi sum_{i>=16} w_i q_i) + min s_x, with
// Q4_K/Q5_K: w the unsigned 4- or 5-bit value, d_lo = d_hi = d sc, min = -dmin m; Q6_K: w = q - 32 (signed, |w| <=
// 32), d_lo and d_hi the two 16-value scales d sc, no min. Both halves' sums come out of one block dot: lanes 0-3
// of the 8 int32 lanes hold values 0-15, lanes 4-7 values 16-31.
// Each weight block is unpacked once per call and multiplied into every row (each row's 8-lane accumulator in a
// small buffer): simpler than the lanes layout above, and as much work per row and block as the per-channel
// products (qtile_direct) of Q8_0.

// Scalar unpacking (the plain C++ path, and the reference of the vector one): the values as int8, the two halves'
// scales, the min.
template <int FORMAT>
struct QBlockK {
  static constexpr int SUPER = FORMAT == Q4_K ? 144 : FORMAT == Q5_K ? 176 : 210;
  static constexpr bool SIGNED = FORMAT == Q6_K, OFFSET = FORMAT != Q6_K;
  static inline void unpack(const uint8_t *row, int64_t b, int8_t w[QK], float d[2], float *min) {
    const uint8_t *s = row + SUPER * (b >> 3);
    const int j = int(b & 7);
    if constexpr (FORMAT == Q6_K) {
      const int h = j >> 2, i = j & 3;
      const uint8_t *ql = s + 64 * h + 32 * (i & 1), *qh = s + 128 + 32 * h;
      for (int l = 0; l < QK; l++) w[l] = int8_t((((ql[l] >> (4 * (i >> 1))) & 15) | (((qh[l] >> (2 * i)) & 3) << 4)) - 32);
      const float dd = half_to_float(s + 208);
      const int8_t *sc = reinterpret_cast<const int8_t *>(s + 192) + 2 * j;
      d[0] = dd * float(sc[0]);
      d[1] = dd * float(sc[1]);
      *min = 0.0f;
    } else {
      int sc, m;
      k_scale_min(s + 4, j, &sc, &m);
      const uint8_t *qs = s + (FORMAT == Q5_K ? 48 : 16) + 32 * (j >> 1);
      for (int l = 0; l < QK; l++) {
        int v = (qs[l] >> (4 * (j & 1))) & 15;
        if constexpr (FORMAT == Q5_K) v |= ((s[16 + l] >> j) & 1) << 4;
        w[l] = int8_t(v);
      }
      d[0] = d[1] = half_to_float(s) * float(sc);
      *min = -(half_to_float(s + 2) * float(m));
    }
  }
#if MST_W >= 8
  // The same with the values in a vector (Q6_K's as int8 q - 32) and the scales as the 8 lanes' (4 x d_lo, 4 x d_hi).
  static inline void unpack(const uint8_t *row, int64_t b, __m256i *w, __m256 *d, float *min) {
    const uint8_t *s = row + SUPER * (b >> 3);
    const int j = int(b & 7);
    auto run = [](const uint8_t *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); };
    auto bits = [](__m256i v, int shift, int mask) {  // (v >> shift) & mask in every byte
      return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(char(mask)));
    };
    if constexpr (FORMAT == Q6_K) {
      const int h = j >> 2, i = j & 3;
      const __m256i q = _mm256_or_si256(bits(run(s + 64 * h + 32 * (i & 1)), 4 * (i >> 1), 15),
                                        _mm256_slli_epi16(bits(run(s + 128 + 32 * h), 2 * i, 3), 4));
      *w = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
      const float dd = half_to_float(s + 208);
      const int8_t *sc = reinterpret_cast<const int8_t *>(s + 192) + 2 * j;
      const float lo = dd * float(sc[0]), hi = dd * float(sc[1]);
      *d = _mm256_setr_ps(lo, lo, lo, lo, hi, hi, hi, hi);
      *min = 0.0f;
    } else {
      int sc, m;
      k_scale_min(s + 4, j, &sc, &m);
      __m256i q = bits(run(s + (FORMAT == Q5_K ? 48 : 16) + 32 * (j >> 1)), 4 * (j & 1), 15);
      if constexpr (FORMAT == Q5_K) q = _mm256_or_si256(q, _mm256_slli_epi16(bits(run(s + 16), j, 1), 4));
      *w = q;
      *d = _mm256_set1_ps(half_to_float(s) * float(sc));
      *min = -(half_to_float(s + 2) * float(m));
    }
  }
#endif
};

template <class F, class Dot>
static void kproduct(const LinearArgs &a, const QRows &x) {
  const int64_t rb = row_bytes(a.format, a.k), nb = x.nb, kp = x.kp, m = a.m;
  parallel_runs(a.threads, a.n, [&](int64_t c0, int64_t c1) {
#if MST_W >= 8
    __m256 *acc = static_cast<__m256 *>(mst_scratch(1, m * (sizeof(__m256) + sizeof(float))));
    float *mins = reinterpret_cast<float *>(acc + m);
    for (int64_t c = c0; c < c1; c++) {
      const uint8_t *row = a.w + c * rb;
      for (int64_t r = 0; r < m; r++) acc[r] = _mm256_setzero_ps(), mins[r] = 0.0f;
      for (int64_t b = 0; b < nb; b++) {
        if ((b & 7) == 0) __builtin_prefetch(row + F::SUPER * (b / 8 + 1));
        __m256i w;
        __m256 d;
        float min;
        F::unpack(row, b, &w, &d, &min);
        for (int64_t r = 0; r < m; r++) {
          const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i *>(x.q + r * kp + b * QK));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<F, Dot>(w, q)),
                                   _mm256_mul_ps(d, _mm256_broadcast_ss(x.d + r * nb + b)), acc[r]);
          if constexpr (F::OFFSET) mins[r] += min * x.s[r * nb + b];
        }
      }
      for (int64_t r = 0; r < m; r++) a.y[r * a.n + c] = epilogue(a, r, c, hsum8(acc[r]) + mins[r]);
    }
#else
    float *acc = static_cast<float *>(mst_scratch(1, m * sizeof(float)));
    for (int64_t c = c0; c < c1; c++) {
      const uint8_t *row = a.w + c * rb;
      for (int64_t r = 0; r < m; r++) acc[r] = 0.0f;
      for (int64_t b = 0; b < nb; b++) {
        alignas(32) int8_t w[QK];
        float d[2], min;
        F::unpack(row, b, w, d, &min);
        for (int64_t r = 0; r < m; r++) {
          const int8_t *q = x.q + r * kp + b * QK;
          int32_t lo = 0, hi = 0;
          for (int i = 0; i < 16; i++) lo += int32_t(w[i]) * int32_t(q[i]);
          for (int i = 16; i < QK; i++) hi += int32_t(w[i]) * int32_t(q[i]);
          acc[r] += (d[0] * float(lo) + d[1] * float(hi)) * x.d[r * nb + b] + min * x.s[r * nb + b];
        }
      }
      for (int64_t r = 0; r < m; r++) a.y[r * a.n + c] = epilogue(a, r, c, acc[r]);
    }
#endif
  });
}

// ---- the compute floor of these products ------------------------------------------------------------------

// Multiply-adds of int8 per second (GMAC/s) on every thread: independent chains of the products' inner step in
// registers (a 32-byte block dot: vpmaddubsw then vpaddw, or vpdpbusd; the fallback's plain loop), 32 per step.
// bench-engine sets the products of many rows (prefill, big batches) against it, as against the FMA peak.
template <class Dot>
static double int8_peak_with(int threads, int64_t iterations) {
  const auto start = std::chrono::steady_clock::now();
  std::vector<int64_t> totals(threads, 0);
  parallel(threads, [&](int t, int) {
    volatile int8_t seed = int8_t(t + 3);
#if MST_W >= 8
    const __m256i u = _mm256_set1_epi8(char(seed)), s = _mm256_set1_epi8(char(seed + 1));
    __m256i acc[12];
    for (int i = 0; i < 12; i++) acc[i] = _mm256_set1_epi32(i);
    for (int64_t it = 0; it < iterations; it++) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; i++) {
        if constexpr (Dot::VNNI) acc[i] = Dot::accumulate(acc[i], u, s);
        else acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(u, s));
      }
    }
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 12; i++) sum = _mm256_add_epi32(sum, acc[i]);
    totals[t] = _mm256_extract_epi32(sum, 0);
#else
    int32_t acc[12] = {};
    uint8_t u[32];
    int8_t w[32];
    for (int j = 0; j < 32; j++) u[j] = uint8_t(seed + j), w[j] = int8_t(seed - j);
    for (int64_t it = 0; it < iterations; it++)
      for (int i = 0; i < 12; i++)
        for (int j = 0; j < 32; j++) acc[i] += int32_t(u[j]) * int32_t(w[j] ^ int8_t(i));
    for (int i = 0; i < 12; i++) totals[t] += acc[i];
#endif
  });
  volatile int64_t sink = 0;
  for (int64_t v : totals) sink = sink + v;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return double(threads) * iterations * 12 * 32 / seconds / 1e9;
}

// ---- entry --------------------------------------------------------------------------------------------------

template <class F, class Dot>
static void qlinear_with(const LinearArgs &a) {
  const int64_t kp = blocks_of(a.k) * QK, nb = kp / QK;
  // one scratch block: xp [M, kp] float32, q [M, kp] int8, d and s [M, nb] float32 (each part 32-byte aligned)
  const int64_t xp_bytes = a.m * kp * 4, q_bytes = a.m * kp, scale_bytes = a.m * nb * 4;
  uint8_t *scratch = static_cast<uint8_t *>(mst_scratch(0, xp_bytes + q_bytes + 2 * scale_bytes));
  float *xp = reinterpret_cast<float *>(scratch);
  int8_t *q = reinterpret_cast<int8_t *>(scratch + xp_bytes);
  float *d = reinterpret_cast<float *>(scratch + xp_bytes + q_bytes), *s = d + a.m * nb;
  prepare_rows(a, xp, kp);
  quantize_rows(xp, a.m, kp, q, d, s, a.threads);
  if constexpr (requires { F::SUPER; }) kproduct<F, Dot>(a, QRows{q, d, s, kp, nb});
  else qproduct<F, Dot>(a, QRows{q, d, s, kp, nb});
}

// False (nothing done) for the products that keep float32 activations: the other formats. Prefill products (more
// than 32 rows) take the same lanes kernel: its integer dot products do 32 multiply-adds per instruction where the
// float32 GEMM does 8, and each group's unpacked blocks serve every row.
template <class Dot>
static bool linear_int8_with(const LinearArgs &a) {
  if (a.m == 0 || a.n == 0) return true;
  switch (a.format) {
    case Q8_0: case Q8_0X8: qlinear_with<QBlockQ8_0, Dot>(a); return true;
    case Q4_0: case Q4_0X8: qlinear_with<QBlockQ4_0, Dot>(a); return true;
    case Q4_1: case Q4_1X8: qlinear_with<QBlockQ4_1, Dot>(a); return true;
    case Q4_K: qlinear_with<QBlockK<Q4_K>, Dot>(a); return true;
    case Q5_K: qlinear_with<QBlockK<Q5_K>, Dot>(a); return true;
    case Q6_K: qlinear_with<QBlockK<Q6_K>, Dot>(a); return true;
    default: return false;
  }
}

#if MST_W >= 8
bool linear_int8(const LinearArgs &a) { return linear_int8_with<DotMaddubs>(a); }
bool linear_int8_vnni(const LinearArgs &a) { return linear_int8_with<DotVnni>(a); }
double int8_peak(int threads, int64_t iterations) { return int8_peak_with<DotMaddubs>(threads, iterations); }
double int8_peak_vnni(int threads, int64_t iterations) { return int8_peak_with<DotVnni>(threads, iterations); }
#else
struct DotPlain;
bool linear_int8(const LinearArgs &a) { return linear_int8_with<DotPlain>(a); }
double int8_peak(int threads, int64_t iterations) { return int8_peak_with<DotPlain>(threads, iterations); }
#endif

}  // namespace MST_NS
