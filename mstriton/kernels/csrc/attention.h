// One decode step of attention for a batch, against a paged KV cache, in place.
//
// In:  qkv [B, (H + 2 Hkv) D]      the fused q/k/v projection of each sequence's newest token
//      positions [B] int32          where that token goes; the cache holds the positions below it
//      cos, sin [P, D]              the rotary tables (rotate-half layout, as model/llama.py builds them)
//      k_pool [R, Hkv, D, bs]       blocks of keys, transposed (positions contiguous); v_pool [R, Hkv, bs, D]
//      block_index [B, blocks]      the pool row of each block of each sequence (this layer's rows)
// Out: out [B, H D]                 softmax(q K^T / sqrt(D)) V over the cache and the new token
//      and the new token's rotated key and its value written into its block at its position (skipped for a
//      position outside the table: padding rows of a batch point every block at the scratch block).
//
// This replaces some twenty MindSpore ops per layer (rotary, two score products, a two-part softmax, masks, the
// cache update), each of which costs about 3 us of dispatch on the CPU; the work itself is small beside the
// weights. The G query heads of a KV head are done together, so each key and value row is read once. Blocks of
// 16 positions keep each key row's run long enough for full vectors (AVX-512: 16 floats).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "args.h"
#include "pool.h"
#include "vec.h"

namespace MST_NS {

static inline void rope(const float *in, const float *cos, const float *sin, int64_t d, float scale, float *out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; i++) out[i] = (in[i] * cos[i] - in[i + half] * sin[i]) * scale;
  for (int64_t i = half; i < d; i++) out[i] = (in[i] * cos[i] + in[i - half] * sin[i]) * scale;
}

void decode_attention(const AttentionArgs &a) {
  const int64_t d = a.dim, groups = a.heads / a.kv_heads, width = (a.heads + 2 * a.kv_heads) * d;
  const int64_t bs = a.block_size, capacity = a.blocks * bs;
  const float scale = 1.0f / std::sqrt(float(d));
  const int64_t tasks = a.batch * a.kv_heads;
  // (sequence, KV head) tasks in runs from a shared counter (pool.h: a descheduled thread delays one run only)
  parallel_runs(a.threads, tasks, [&](int64_t first, int64_t last) {
    std::vector<float> q(groups * d), k(d), scores(groups * (capacity + 1)), acc(groups * d);
    for (int64_t task = first; task < last; task++) {
      const int64_t b = task / a.kv_heads, g = task % a.kv_heads;
      const int64_t pos = std::max<int32_t>(a.positions[b], 0);
      const int64_t len = std::min<int64_t>(pos, capacity);  // cached positions this token attends to
      const int64_t t = std::min<int64_t>(pos, a.table_len - 1);
      const int32_t *table = a.block_index + b * a.blocks;
      const float *row = a.qkv + b * width, *cos = a.cos + t * d, *sin = a.sin + t * d;
      const float *v = row + (a.heads + a.kv_heads) * d + g * d;
      rope(row + a.heads * d + g * d, cos, sin, d, 1.0f, k.data());
      for (int64_t i = 0; i < groups; i++) rope(row + (g * groups + i) * d, cos, sin, d, scale, q.data() + i * d);
      const int64_t span = capacity + 1;  // scores of one query head: the cached positions, then the new token

      // Scores against the cache, block by block: K^T rows are contiguous in the position within a block.
      std::fill(scores.begin(), scores.end(), 0.0f);
      for (int64_t blk = 0; blk * bs < len; blk++) {
        const float *kb = a.k_pool + (int64_t(table[blk]) * a.kv_heads + g) * d * bs;
        const int64_t base = blk * bs, n = std::min(bs, len - base);
        for (int64_t e = 0; e < d; e++) {
          const float *krow = kb + e * bs;
          for (int64_t i = 0; i < groups; i++) {
            float *s = scores.data() + i * span + base;
            const float qe = q[i * d + e];
            int64_t j = 0;
            for (; j + W <= n; j += W) store(s + j, load<vf>(s + j) + splat(qe) * load<vf>(krow + j));
            for (; j < n; j++) s[j] += qe * krow[j];
          }
        }
      }
      for (int64_t i = 0; i < groups; i++) {
        float *s = scores.data() + i * span;
        float self = 0.0f;
        for (int64_t e = 0; e < d; e++) self += q[i * d + e] * k[e];
        s[len] = self;  // the new token itself, after the cached ones
        float top = s[0];
        for (int64_t j = 1; j <= len; j++) top = std::max(top, s[j]);
        vf sums{};
        int64_t j = 0;
        for (; j + W <= len + 1; j += W) {
          const vf p = vexp(load<vf>(s + j) - top);
          store(s + j, p);
          sums += p;
        }
        float total = hsum(sums);
        for (; j <= len; j++) total += (s[j] = std::exp(s[j] - top));
        float *o = acc.data() + i * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t blk = 0; blk * bs < len; blk++) {
          const float *vb = a.v_pool + (int64_t(table[blk]) * a.kv_heads + g) * bs * d;
          const int64_t base = blk * bs, n = std::min(bs, len - base);
          for (int64_t jj = 0; jj < n; jj++) {
            const float p = s[base + jj];
            const float *vrow = vb + jj * d;
            int64_t e = 0;
            for (; e + W <= d; e += W) store(o + e, load<vf>(o + e) + splat(p) * load<vf>(vrow + e));
            for (; e < d; e++) o[e] += p * vrow[e];
          }
        }
        const float inv = 1.0f / total;
        float *dst = a.out + b * a.heads * d + (g * groups + i) * d;
        for (int64_t e = 0; e < d; e++) dst[e] = (o[e] + s[len] * v[e]) * inv;
      }
      // The new token's K and V into its block (the engine gave the sequence that block before the step).
      if (a.positions[b] >= 0 && pos < capacity) {
        const int64_t blk = table[pos / bs], off = pos % bs;
        float *kc = a.k_pool + (blk * a.kv_heads + g) * d * bs + off;
        for (int64_t e = 0; e < d; e++) kc[e * bs] = k[e];
        std::memcpy(a.v_pool + ((blk * a.kv_heads + g) * bs + off) * d, v, d * sizeof(float));
      }
    }
  });
}

}  // namespace MST_NS
