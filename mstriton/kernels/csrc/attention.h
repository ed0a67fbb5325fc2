// One decode step of attention for a batch, against the KV cache in place.
//
// In:  qkv [B, (H + 2 Hkv) D]   the fused q/k/v projection of each sequence's newest token
//      positions [B] int32       where that token goes; the cache holds positions below it
//      cos, sin [P, D]           the rotary tables (rotate-half layout, as model/llama.py builds them)
//      k_cache [B, Hkv, D, S]    keys, stored transposed; v_cache [B, Hkv, S, D]
// Out: out [B, H D]              softmax(q K^T / sqrt(D)) V over the cache and the new token
//      k_new, v_new [B, Hkv, D]  the new token's rotated key and its value, for the caller to store
//
// This replaces some twenty MindSpore ops per layer (rotary, two score products, a two-part softmax, masks), each
// of which costs about 3 us of dispatch on the CPU; the work itself is small beside the weights. The G query
// heads of a KV head are done together, so each key and value row is read once.
#pragma once

#include <algorithm>
#include <cmath>
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
  const float scale = 1.0f / std::sqrt(float(d));
  const int64_t tasks = a.batch * a.kv_heads;
  parallel(a.threads, [&](int t, int nt) {
    std::vector<float> q(groups * d), k(d), scores(groups * (a.seq + 1)), acc(groups * d);
    int64_t first, last;
    share(tasks, t, nt, &first, &last);
    for (int64_t task = first; task < last; task++) {
      const int64_t b = task / a.kv_heads, g = task % a.kv_heads;
      const int64_t pos = std::max<int32_t>(a.positions[b], 0);
      const int64_t len = std::min<int64_t>(pos, a.seq);  // cached positions this token attends to
      const int64_t t = std::min<int64_t>(pos, a.table_len - 1);
      const float *row = a.qkv + b * width, *cos = a.cos + t * d, *sin = a.sin + t * d;
      const float *v = row + (a.heads + a.kv_heads) * d + g * d;
      rope(row + a.heads * d + g * d, cos, sin, d, 1.0f, k.data());
      std::memcpy(a.k_new + (b * a.kv_heads + g) * d, k.data(), d * sizeof(float));
      std::memcpy(a.v_new + (b * a.kv_heads + g) * d, v, d * sizeof(float));
      for (int64_t i = 0; i < groups; i++) rope(row + (g * groups + i) * d, cos, sin, d, scale, q.data() + i * d);

      // Scores against the cache: K^T rows are contiguous in the position, so the inner loop runs along it.
      const float *kc = a.k_cache + (b * a.kv_heads + g) * d * a.seq;
      std::fill(scores.begin(), scores.end(), 0.0f);
      for (int64_t e = 0; e < d; e++) {
        const float *krow = kc + e * a.seq;
        for (int64_t i = 0; i < groups; i++) {
          float *s = scores.data() + i * (a.seq + 1);
          const float qe = q[i * d + e];
          int64_t j = 0;
          for (; j + W <= len; j += W) store(s + j, load<vf>(s + j) + splat(qe) * load<vf>(krow + j));
          for (; j < len; j++) s[j] += qe * krow[j];
        }
      }
      const float *vc = a.v_cache + (b * a.kv_heads + g) * a.seq * d;
      for (int64_t i = 0; i < groups; i++) {
        float *s = scores.data() + i * (a.seq + 1);
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
        for (int64_t j = 0; j < len; j++) {
          const float p = s[j];
          const float *vrow = vc + j * d;
          int64_t e = 0;
          for (; e + W <= d; e += W) store(o + e, load<vf>(o + e) + splat(p) * load<vf>(vrow + e));
          for (; e < d; e++) o[e] += p * vrow[e];
        }
        const float inv = 1.0f / total;
        float *dst = a.out + b * a.heads * d + (g * groups + i) * d;
        for (int64_t e = 0; e < d; e++) dst[e] = (o[e] + s[len] * v[e]) * inv;
      }
    }
  });
}

}  // namespace MST_NS
