// y[M, N] = pre(x)[M, K] @ W^T (+ bias[N]) (+ residual[M, N]) for a weight matrix W of any format (formats.h).
//
// pre(x) is x itself, RMSNorm(x) * g (the norm fused into the projection after it), or silu(gate) * up of a
// [M, 2K] gate/up product (SwiGLU fused into the down projection). It is computed once per call into a padded
// copy of the rows, so every product below reads whole 32-value blocks of x.
//
// Two shapes of product, both dequantizing the weights to float32 in registers and multiplying in float32:
// - M <= 32 (decode batches): a GEMV. Each weight block is decoded once and multiplied into every row: for up to 3
//   rows straight from registers, several output channels at a time so that enough independent accumulators hide
//   the FMA latency; for more rows through a small decoded buffer in L1 (see gemv_decoded). The weights stream
//   from memory exactly once per call: this is the bandwidth-bound path.
// - M > 32 (prefill): a GEMM. Each thread decodes a panel of 2W output channels into an [K, 2W] float32 buffer that
//   stays in L2, then runs a register-blocked outer-product micro-kernel over all rows (MR rows x 2W channels of
//   accumulators, one broadcast of x per FMA pair): compute-bound, the decode cost shared by all M rows.
// Output channels are handed to the pool's threads (pool.h) in runs of contiguous channels from a shared counter.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "args.h"
#include "decode.h"
#include "pool.h"

namespace MST_NS {

// The rows of pre(x), each padded with zeros to whole blocks: xp[M, kp].
static void prepare_rows(const LinearArgs &a, float *xp, int64_t kp) {
  parallel_runs(a.m > 4 ? a.threads : 1, a.m, [&](int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++) {
    float *out = xp + r * kp;
    if (a.pre == PRE_SWIGLU) {
      const float *gate = a.x + r * 2 * a.k, *up = gate + a.k;
      int64_t i = 0;
      for (; i + W <= a.k; i += W) {
        const vf g = load<vf>(gate + i);
        store(out + i, g / (1.0f + vexp(-g)) * load<vf>(up + i));
      }
      for (; i < a.k; i++) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    } else if (a.pre == PRE_RMSNORM) {
      const float *in = a.x + r * a.k;
      float ss = 0.0f;
      for (int64_t i = 0; i < a.k; i++) ss += in[i] * in[i];
      const float inv = 1.0f / std::sqrt(ss / float(a.k) + a.eps);
      for (int64_t i = 0; i < a.k; i++) out[i] = in[i] * inv * a.norm[i];
    } else {
      std::memcpy(out, a.x + r * a.k, a.k * sizeof(float));
    }
    std::memset(out + a.k, 0, (kp - a.k) * sizeof(float));
  }
  });
}

static inline float epilogue(const LinearArgs &a, int64_t r, int64_t c, float v) {
  if (a.bias) v += a.bias[c];
  if (a.residual) v += a.residual[r * a.n + c];
  return v;
}

// ---- GEMV: MR rows x NC channels per tile -------------------------------------------------------------------

// Software prefetch for a tile of channels [c0, c0 + nc), contiguous rows of rb bytes: over the tile's `steps`
// block steps, the same number of bytes MST_AHEAD bytes further on in the matrix, a few cache lines per step.
// Why: a tile reads its nc rows side by side (nc streams a few hundred bytes apart), which the hardware prefetchers
// do not follow at full rate; one core then waits on DRAM latency (measured on a 2-core EPYC VM: 7 GB/s per core
// from DRAM against 23 GB/s in cache, 12 GB/s for two, where a plain sequential read gets 29).
#ifndef MST_AHEAD
#define MST_AHEAD 4096
#endif
struct Ahead {
  const char *next, *end;
  int64_t per_step;
  Ahead(const uint8_t *w, int64_t c0, int64_t nc, int64_t rb, int64_t steps)
      : next(reinterpret_cast<const char *>(w + c0 * rb) + MST_AHEAD), end(next),
        per_step((nc * rb + steps - 1) / steps) {}
  inline void step() {
    end += per_step;
    for (; next < end; next += 64) __builtin_prefetch(next);
  }
};

template <class D, int MR, int NC>
static void gemv_tile(const LinearArgs &a, const float *xp, int64_t kp, int64_t rb, int64_t c0) {
  const int64_t nb = kp / QK;
  vf acc[NC][MR];
  for (int c = 0; c < NC; c++)
    for (int r = 0; r < MR; r++) acc[c][r] = vf{};
  Ahead ahead(a.w, c0, NC, rb, nb);
  for (int64_t b = 0; b < nb; b++) {
    ahead.step();
    for (int c = 0; c < NC; c++) {
      vf w[NV];
      decode_block<D>(a.w, rb, c0 + c, b, a.k, w);
      for (int r = 0; r < MR; r++) {
        const float *x = xp + r * kp + b * QK;
        for (int j = 0; j < NV; j++) acc[c][r] = load<vf>(x + j * W) * w[j] + acc[c][r];
      }
    }
  }
  for (int c = 0; c < NC; c++)
    for (int r = 0; r < MR; r++) a.y[r * a.n + c0 + c] = epilogue(a, r, c0 + c, hsum(acc[c][r]));
}

template <class D, int MR>
static void gemv(const LinearArgs &a, const float *xp, int64_t kp) {
  // Enough independent accumulators (channels x rows) to cover the FMA latency, few enough to stay in registers.
  constexpr int NC = 8 / MR;
  const int64_t rb = row_bytes(a.format, a.k);
  const int64_t groups = a.n / NC;
  // Runs of channel groups from a shared counter (pool.h); the channels left over by the grouping, one at a
  // time, are the last items.
  const int64_t extra = a.n - groups * NC;
  parallel_runs(a.threads, groups + extra, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      if (i < groups) gemv_tile<D, MR, NC>(a, xp, kp, rb, i * NC);
      else gemv_tile<D, MR, 1>(a, xp, kp, rb, groups * NC + (i - groups));
    }
  });
}

// ---- GEMV of 4..16 rows: CT channels decoded once into L1, then RT x CT tiles of dot products ---------------
// Decoding straight into registers for every row (gemv above) makes the loads of x as many as the FMAs; with the
// channels' weights decoded once into a small buffer, each loaded vector of x or w feeds 4 FMAs.

// RT x CT accumulators plus CT decoded weight vectors must fit the ISA's vector registers (x comes from memory,
// as the FMA's operand): 4 x 4 + 4 on AVX-512's 32; on AVX2's 16, 4 x 4 spilled accumulators to the stack on
// every iteration (seen in the compiled loop: 16 FMAs beside ~20 stack loads and stores), 4 x 3 + 3 fits.
constexpr int CT = W == 8 ? 3 : 4, RT = 4;

template <int R, int C>
static inline void dot_tile(const LinearArgs &a, const float *xp, int64_t kp, const float *wbuf, int64_t r0,
                            int64_t c0) {
  vf acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = vf{};
  for (int64_t i = 0; i < kp; i += W) {
    vf w[C];
    for (int c = 0; c < C; c++) w[c] = load<vf>(wbuf + c * kp + i);
    for (int r = 0; r < R; r++) {
      const vf x = load<vf>(xp + (r0 + r) * kp + i);
      for (int c = 0; c < C; c++) acc[r][c] = x * w[c] + acc[r][c];
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) a.y[(r0 + r) * a.n + c0 + c] = epilogue(a, r0 + r, c0 + c, hsum(acc[r][c]));
}

template <int R, int C>
static inline void dot_rows(const LinearArgs &a, const float *xp, int64_t kp, const float *wbuf, int64_t r0,
                            int rows, int64_t c0) {
  if constexpr (R > 0) {
    if (rows == R) return dot_tile<R, C>(a, xp, kp, wbuf, r0, c0);
    return dot_rows<R - 1, C>(a, xp, kp, wbuf, r0, rows, c0);
  }
}

template <class D, int C>
static inline void decoded_group(const LinearArgs &a, const float *xp, int64_t kp, int64_t rb, float *wbuf,
                                 int64_t c0) {
  const int64_t nb = kp / QK;
  for (int c = 0; c < C; c++) {
    for (int64_t b = 0; b < nb; b++) {
      vf w[NV];
      decode_block<D>(a.w, rb, c0 + c, b, a.k, w);
      for (int j = 0; j < NV; j++) store(wbuf + c * kp + b * QK + j * W, w[j]);
    }
  }
  int64_t r0 = 0;
  for (; r0 + RT <= a.m; r0 += RT) dot_tile<RT, C>(a, xp, kp, wbuf, r0, c0);
  if (r0 < a.m) dot_rows<RT - 1, C>(a, xp, kp, wbuf, r0, int(a.m - r0), c0);
}

template <class D>
static void gemv_decoded(const LinearArgs &a, const float *xp, int64_t kp) {
  const int64_t rb = row_bytes(a.format, a.k), groups = a.n / CT;
  const int64_t extra = a.n - groups * CT;  // channels left over by the grouping: the last items, one each
  parallel_runs(a.threads, groups + extra, [&](int64_t i0, int64_t i1) {
    float *wbuf = static_cast<float *>(mst_scratch(1, CT * kp * sizeof(float)));
    for (int64_t i = i0; i < i1; i++) {
      if (i < groups) decoded_group<D, CT>(a, xp, kp, rb, wbuf, i * CT);
      else decoded_group<D, 1>(a, xp, kp, rb, wbuf, groups * CT + (i - groups));
    }
  });
}

// ---- GEMM: panels of NR = 2W channels, micro-kernel of MR_GEMM rows --------------------------------------------

constexpr int NR = 2 * W;
constexpr int MR_GEMM = W == 16 ? 8 : (W == 8 ? 6 : 4);  // 2 * MR accumulators fit the ISA's vector registers

// The micro-kernel reads its MR rows of x as one stream: each tile of MR rows packed as [kp][MR] (packed_rows), so
// that the MR broadcasts of a step read consecutive floats from one pointer. (Reading them from MR rows kp apart
// took MR row offsets, more than the general registers hold beside the loop's pointers: GCC reloaded one from the
// stack before each broadcast.)
template <int MR>
static inline void micro_kernel(const LinearArgs &a, const float *xt, int64_t kp, const float *panel, int64_t r0,
                                int64_t c0) {
  vf acc[MR][2];
  for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = vf{};
  for (int64_t i = 0; i < kp; i++) {
    const vf b0 = load<vf>(panel + i * NR), b1 = load<vf>(panel + i * NR + W);
    for (int r = 0; r < MR; r++) {
      const vf s = splat(xt[i * MR + r]);
      acc[r][0] = s * b0 + acc[r][0];
      acc[r][1] = s * b1 + acc[r][1];
    }
  }
  const int64_t cols = std::min<int64_t>(NR, a.n - c0);
  for (int r = 0; r < MR; r++) {
    alignas(64) float out[NR];
    store(out, acc[r][0]);
    store(out + W, acc[r][1]);
    float *y = a.y + (r0 + r) * a.n + c0;
    for (int64_t c = 0; c < cols; c++) y[c] = epilogue(a, r0 + r, c0 + c, out[c]);
  }
}

template <int MR>
static void micro_rows(const LinearArgs &a, const float *xt, int64_t kp, const float *panel, int64_t r0, int rows,
                       int64_t c0) {
  if constexpr (MR > 0) {
    if (rows == MR) return micro_kernel<MR>(a, xt, kp, panel, r0, c0);
    return micro_rows<MR - 1>(a, xt, kp, panel, r0, rows, c0);
  }
}

// xp [M, kp] -> out: tiles of MR_GEMM rows (the last one of the rows left), each [kp][rows of the tile].
static void packed_rows(const LinearArgs &a, const float *xp, int64_t kp, float *out) {
  const int64_t tiles = (a.m + MR_GEMM - 1) / MR_GEMM;
  parallel_runs(a.threads, tiles, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const int64_t r0 = t * MR_GEMM, rows = std::min<int64_t>(MR_GEMM, a.m - r0);
      float *tile = out + r0 * kp;
      for (int64_t i = 0; i < kp; i++)
        for (int64_t r = 0; r < rows; r++) tile[i * rows + r] = xp[(r0 + r) * kp + i];
    }
  });
}

// xp holds 2 M kp floats: the rows, then room for their packed copy.
template <class D>
static void gemm(const LinearArgs &a, float *xp, int64_t kp) {
  const int64_t rb = row_bytes(a.format, a.k), nb = kp / QK;
  const int64_t panels = (a.n + NR - 1) / NR;
  float *xt = xp + a.m * kp;
  packed_rows(a, xp, kp, xt);
  parallel_runs(a.threads, panels, [&](int64_t p0, int64_t p1) {
    float *panel = static_cast<float *>(mst_scratch(1, kp * NR * sizeof(float)));
    alignas(64) float block[QK];
    for (int64_t p = p0; p < p1; p++) {
      const int64_t c0 = p * NR;
      for (int c = 0; c < NR; c++) {  // decode the panel's channels, transposed to [K, NR]
        if (c0 + c >= a.n) {
          for (int64_t i = 0; i < kp; i++) panel[i * NR + c] = 0.0f;
          continue;
        }
        for (int64_t b = 0; b < nb; b++) {
          vf w[NV];
          decode_block<D>(a.w, rb, c0 + c, b, a.k, w);
          for (int j = 0; j < NV; j++) store(block + j * W, w[j]);
          for (int i = 0; i < QK; i++) panel[(b * QK + i) * NR + c] = block[i];
        }
      }
      int64_t r0 = 0;
      for (; r0 + MR_GEMM <= a.m; r0 += MR_GEMM) micro_kernel<MR_GEMM>(a, xt + r0 * kp, kp, panel, r0, c0);
      if (r0 < a.m) micro_rows<MR_GEMM - 1>(a, xt + r0 * kp, kp, panel, r0, int(a.m - r0), c0);
    }
  });
}

// ---- entry --------------------------------------------------------------------------------------------------

// Up to 3 rows decode weights straight into registers; up to GEMV_MAX_ROWS through a decoded buffer;
// more rows (prefill) take the GEMM. Thresholds from bench-engine's sweeps on an AVX-512 CPU.
constexpr int64_t GEMV_MAX_ROWS = 32;

template <class D>
static void linear_with(const LinearArgs &a) {
  const int64_t kp = blocks_of(a.k) * QK;
  // the GEMM also packs the rows (gemm): room for both
  const int64_t copies = a.m > GEMV_MAX_ROWS ? 2 : 1;
  float *xp = static_cast<float *>(mst_scratch(0, std::max<int64_t>(copies * a.m * kp, 16) * sizeof(float)));
  prepare_rows(a, xp, kp);
  if (a.m == 1)
    gemv<D, 1>(a, xp, kp);
  else if (a.m == 2)
    gemv<D, 2>(a, xp, kp);
  else if (a.m == 3)
    gemv<D, 3>(a, xp, kp);
  else if (a.m <= GEMV_MAX_ROWS)
    gemv_decoded<D>(a, xp, kp);
  else
    gemm<D>(a, xp, kp);
}

void linear(const LinearArgs &a) {
  if (a.m == 0 || a.n == 0) return;
  switch (a.format) {
    case F32: return linear_with<DecodeF32>(a);
    case BF16: return linear_with<DecodeBF16>(a);
    case INT8: return linear_with<DecodeINT8>(a);
    case Q8_0: return linear_with<DecodeQ8_0>(a);
    case Q4_0: return linear_with<DecodeQ4_0>(a);
    case Q4_1: return linear_with<DecodeQ4_1>(a);
    case Q8_0X8: return linear_with<X8<DecodeQ8_0, Q8_0X8>>(a);
    case Q4_0X8: return linear_with<X8<DecodeQ4_0, Q4_0X8>>(a);
    case Q4_1X8: return linear_with<X8<DecodeQ4_1, Q4_1X8>>(a);
    case Q4_K: return linear_with<DecodeQ4_K>(a);
    case Q5_K: return linear_with<DecodeQ5_K>(a);
    case Q6_K: return linear_with<DecodeQ6_K>(a);
  }
}

}  // namespace MST_NS
