// The arguments of each kernel, shared by every ISA build (isa.cpp) and the entry points (entry.cpp).
#pragma once

#include <cstdint>

enum Pre : int { PRE_NONE = 0, PRE_RMSNORM = 1, PRE_SWIGLU = 2 };

struct LinearArgs {
  int format;             // formats.h
  int pre;                // Pre
  const float *x;         // [M, K] (PRE_SWIGLU: [M, 2K], gate then up)
  int64_t m, k;
  const float *norm;      // PRE_RMSNORM: [K]
  float eps;
  const uint8_t *w;       // [N, row_bytes(format, K)]
  int64_t n;
  const float *bias;      // [N] or null
  const float *residual;  // [M, N] or null
  float *y;               // [M, N]
  int threads;
};

// Decode attention over a paged cache (attention.h): block_index[b * blocks + i] is the pool row holding
// positions [i * block_size, (i + 1) * block_size) of sequence b, in this layer.
struct AttentionArgs {
  const float *qkv;
  const int32_t *positions;
  const float *cos, *sin;
  float *k_pool, *v_pool;      // [rows, Hkv, D, block_size] and [rows, Hkv, block_size, D]
  const int32_t *block_index;  // [B, blocks]
  float *out;                  // [B, H D]
  int64_t batch, heads, kv_heads, dim, blocks, block_size, table_len;
  int threads;
};
