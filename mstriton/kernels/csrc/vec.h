// Portable SIMD vectors for the kernels, written once with GCC vector extensions.
//
// isa.cpp is compiled three times with MST_W = 16 (AVX-512: -mavx512f -mavx512bw -mavx512vl -mfma -mf16c),
// 8 (AVX2: -mavx2 -mfma -mf16c) and 4 (baseline x86-64 SSE2, the plain fallback), each inside its own namespace;
// entry.cpp picks one at run time from cpuid. The same source then serves every CPU, and the compiler turns the
// vector arithmetic below into that ISA's instructions (a * b + c into FMA where the ISA has it).
#pragma once

#include <cstdint>
#include <cstring>

#include <immintrin.h>

#ifndef MST_W
#error "compile with -DMST_W=16|8|4"
#endif

namespace MST_NS {

constexpr int W = MST_W;          // float lanes per vector
constexpr int QK = 32;            // values per block in every format (GGUF's block size)
constexpr int NV = QK / W;        // vectors per block

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint8_t vb __attribute__((vector_size(W)));
typedef int8_t vsb __attribute__((vector_size(W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

// Unaligned loads and stores (memcpy of a fixed size compiles to one vector move).
template <class V>
static inline V load(const void *p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
static inline void store(float *p, vf v) { std::memcpy(p, &v, sizeof(v)); }
static inline vf splat(float s) {  // a broadcast (vf{} + s costs an add: -0.0 + s is not s for the compiler)
#if MST_W == 16
  return _mm512_set1_ps(s);
#elif MST_W == 8
  return _mm256_set1_ps(s);
#else
  return _mm_set1_ps(s);
#endif
}
static inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < W; i++) s += v[i];
  return s;
}
static inline vf to_float(vi v) { return __builtin_convertvector(v, vf); }

// W bytes / halfwords widened to W int32 lanes. Written with intrinsics: GCC turned __builtin_convertvector of a
// byte vector loaded by memcpy into scalar code (measured: Q8_0 ran at a tenth of the read bandwidth).
static inline vi widen_s8(const void *p) {
#if MST_W == 16
  return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i *>(p)));
#elif MST_W == 8
  return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i *>(p)));
#else
  const int8_t *b = static_cast<const int8_t *>(p);
  return vi{b[0], b[1], b[2], b[3]};
#endif
}
static inline vi widen_u8(const void *p) {
#if MST_W == 16
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i *>(p)));
#elif MST_W == 8
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i *>(p)));
#else
  const uint8_t *b = static_cast<const uint8_t *>(p);
  return vi{b[0], b[1], b[2], b[3]};
#endif
}
static inline vu widen_u16(const void *p) {
#if MST_W == 16
  return (vu)_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i *>(p)));
#elif MST_W == 8
  return (vu)_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i *>(p)));
#else
  const uint16_t *h = static_cast<const uint16_t *>(p);
  return vu{h[0], h[1], h[2], h[3]};
#endif
}

// exp(x) for a vector: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial to r^7 (relative error
// below 2e-7, about one float ulp), times 2^n built in the exponent bits. Inputs below -87 give 0 (as a masked
// score should), above 88 are clamped. The scalar expf of libm per element cost more than the matmuls beside it.
static inline vf vexp(vf x) {
  x = x < splat(88.0f) ? x : splat(88.0f);
  const vi underflow = x < splat(-87.0f);
  const vf t = x * 1.44269504088896341f;
  const vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const vf r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-06f;
  vf p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf result = p * __builtin_bit_cast(vf, bits);
  return underflow ? vf{} : result;
}

// IEEE half -> float. F16C has an instruction for it; elsewhere the compiler's _Float16 support does it.
static inline float half_to_float(const uint8_t *p) {
  _Float16 h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

}  // namespace MST_NS
