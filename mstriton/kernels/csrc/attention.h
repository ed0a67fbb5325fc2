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

static inline void prefetch_lines(const float *p, int64_t count) {
  const char *c = reinterpret_cast<const char *>(p);
  for (int64_t off = 0; off < count * int64_t(sizeof(float)); off += 64) __builtin_prefetch(c + off);
}

// How many blocks ahead a task asks for its keys (see decode_attention).
constexpr int64_t KEY_BLOCKS_AHEAD = 4;

// Scores of ROWS query heads (q [ROWS, d]) against one whole block of keys (kb: K^T [d, bs], bs = BLOCK_VECTORS
// vectors): ROWS x BLOCK_VECTORS accumulators in registers, each key vector loaded once for all rows.
constexpr int BLOCK_VECTORS = 16 / W > 0 ? 16 / W : 1;  // blocks of 16 positions (the engine's default)
template <int ROWS>
static inline void block_scores(const float *kb, int64_t d, const float *q, float *s, int64_t span) {
  constexpr int64_t bs = BLOCK_VECTORS * W;
  vf acc[ROWS][BLOCK_VECTORS];
  for (int i = 0; i < ROWS; i++)
    for (int j = 0; j < BLOCK_VECTORS; j++) acc[i][j] = vf{};
  for (int64_t e = 0; e < d; e++) {
    vf key[BLOCK_VECTORS];
    for (int j = 0; j < BLOCK_VECTORS; j++) key[j] = load<vf>(kb + e * bs + j * W);
    for (int i = 0; i < ROWS; i++) {
      const vf qe = splat(q[i * d + e]);
      for (int j = 0; j < BLOCK_VECTORS; j++) acc[i][j] = qe * key[j] + acc[i][j];
    }
  }
  for (int i = 0; i < ROWS; i++)
    for (int j = 0; j < BLOCK_VECTORS; j++) store(s + i * span + j * W, acc[i][j]);
}
static inline void block_scores_rows(const float *kb, int64_t d, const float *q, float *s, int64_t span, int64_t rows) {
  switch (rows) {
    case 1: return block_scores<1>(kb, d, q, s, span);
    case 2: return block_scores<2>(kb, d, q, s, span);
    case 3: return block_scores<3>(kb, d, q, s, span);
    default: return block_scores<4>(kb, d, q, s, span);
  }
}

// o[h][d] = sum over the cached positions j < len of p[h][j] V[j] for HEADS query heads of one KV head (p rows
// `span` apart, o rows d apart), in chunks of CV vectors of d: HEADS x CV accumulators in registers, each value
// vector loaded once for all the heads. (One head at a time left 8 accumulators, each one FMA per position: the
// loop waited on FMA latency.)
template <int HEADS, int CV>
static inline void weighted_values(const float *v_pool, const int32_t *table, int64_t kv_heads, int64_t g,
                                   int64_t bs, int64_t d, int64_t len, const float *p, int64_t span, float *o) {
  int64_t e0 = 0;
  for (; e0 + CV * W <= d; e0 += CV * W) {
    vf acc[HEADS][CV];
    for (int h = 0; h < HEADS; h++)
      for (int c = 0; c < CV; c++) acc[h][c] = vf{};
    for (int64_t blk = 0; blk * bs < len; blk++) {
      const float *vb = v_pool + (int64_t(table[blk]) * kv_heads + g) * bs * d + e0;
      const int64_t base = blk * bs, n = std::min(bs, len - base);
      for (int64_t j = 0; j < n; j++) {
        vf value[CV];
        for (int c = 0; c < CV; c++) value[c] = load<vf>(vb + j * d + c * W);
        for (int h = 0; h < HEADS; h++) {
          const vf weight = splat(p[h * span + base + j]);
          for (int c = 0; c < CV; c++) acc[h][c] = weight * value[c] + acc[h][c];
        }
      }
    }
    for (int h = 0; h < HEADS; h++)
      for (int c = 0; c < CV; c++) store(o + h * d + e0 + c * W, acc[h][c]);
  }
  // what is left of d (not a multiple of the chunk): one value at a time
  for (int64_t e = e0; e < d; e++) {
    for (int h = 0; h < HEADS; h++) {
      float total = 0.0f;
      for (int64_t blk = 0; blk * bs < len; blk++) {
        const float *vb = v_pool + (int64_t(table[blk]) * kv_heads + g) * bs * d + e;
        const int64_t base = blk * bs, n = std::min(bs, len - base);
        for (int64_t j = 0; j < n; j++) total += p[h * span + base + j] * vb[j * d];
      }
      o[h * d + e] = total;
    }
  }
}

// Up to 4 heads at a time; chunks sized so accumulators, values and a broadcast fit the vector registers (AVX2's
// 16: 3 x 4 or 4 x 2; AVX-512's 32: 4 x 4).
static inline void weighted_values_heads(const float *v_pool, const int32_t *table, int64_t kv_heads, int64_t g,
                                         int64_t bs, int64_t d, int64_t len, const float *p, int64_t span,
                                         int64_t heads, float *o) {
  constexpr int WIDE = W == 16 ? 4 : 2;  // chunk of the 4-head case
  for (int64_t h = 0; h < heads; h += 4) {
    const float *ph = p + h * span;
    float *oh = o + h * d;
    switch (std::min<int64_t>(4, heads - h)) {
      case 1: weighted_values<1, 4>(v_pool, table, kv_heads, g, bs, d, len, ph, span, oh); break;
      case 2: weighted_values<2, 4>(v_pool, table, kv_heads, g, bs, d, len, ph, span, oh); break;
      case 3: weighted_values<3, 4>(v_pool, table, kv_heads, g, bs, d, len, ph, span, oh); break;
      default: weighted_values<4, WIDE>(v_pool, table, kv_heads, g, bs, d, len, ph, span, oh); break;
    }
  }
}

// Decode attention in two passes. Pass 1: items (sequence, KV head, part), each the unnormalized attention of the
// KV head's query heads over one part of the sequence's cached blocks (the last part also over the new token):
// the largest score m, the sum l of exp(score - m), and o = sum of exp(score - m) V. Pass 2: per (sequence, KV
// head), the parts merged (out = sum e^(m_i - M) o_i / sum e^(m_i - M) l_i). Before both (pass 0), each row's new
// K and V are written into its block.
// Parts are fixed ranges of PART_BLOCKS blocks, the same whatever else is in the batch: a sequence's attention is
// then the same float operations in the same order alone or beside others (a greedy answer does not depend on what
// runs beside it). An earlier cut chose the number of parts from the batch (more for one sequence, to keep both
// threads busy): a row's sums then changed with the batch by about 1e-5, which int8 activations turned into other
// tokens after a dozen steps. A sequence within one part (or a batch whose table fits in one) needs no pass 2: pass 1
// finishes it (normalizes into a.out), with the same arithmetic as the merge of one part.
constexpr int64_t PART_BLOCKS = 4;

void decode_attention(const AttentionArgs &a) {
  const int64_t d = a.dim, groups = a.heads / a.kv_heads, width = (a.heads + 2 * a.kv_heads) * d;
  const int64_t bs = a.block_size, capacity = a.blocks * bs;
  const float scale = 1.0f / std::sqrt(float(d));
  const int64_t tasks = a.batch * a.kv_heads;
  if (tasks <= 0) return;
  const int64_t parts = std::max<int64_t>((a.blocks + PART_BLOCKS - 1) / PART_BLOCKS, 1);
  const int64_t items = tasks * parts;
  // per item: the largest score and the sum per query head, and the unnormalized output (with one part, the task's
  // output is written straight into a.out instead)
  std::vector<float> part_max(parts > 1 ? items * groups : 0), part_sum(parts > 1 ? items * groups : 0),
      part_out(parts > 1 ? items * groups * d : 0);
  // The new token's rotated key k and its value into its block (the engine gave the sequence that block before the
  // step; attention reads only the positions below it).
  auto store_new_token = [&](int64_t b, int64_t g, const float *k) {
    const int64_t pos = std::max<int32_t>(a.positions[b], 0);
    if (a.positions[b] < 0 || pos >= capacity) return;
    const float *v = a.qkv + b * width + (a.heads + a.kv_heads) * d + g * d;
    const int64_t blk = a.block_index[b * a.blocks + pos / bs], off = pos % bs;
    float *kc = a.k_pool + (blk * a.kv_heads + g) * d * bs + off;
    for (int64_t e = 0; e < d; e++) kc[e * bs] = k[e];
    std::memcpy(a.v_pool + ((blk * a.kv_heads + g) * bs + off) * d, v, d * sizeof(float));
  };

  // Pass 0: every row's new key and value into the pool first, then the attention reads. A row attends to the
  // cached positions below its own, so several rows of one sequence at consecutive positions (a speculative
  // step verifying drafted tokens) each see the rows before them, with the same arithmetic as if those had been
  // decoded in earlier steps; a row never reads its own position from the pool (the new token comes from qkv).
  parallel_runs(a.threads, tasks, [&](int64_t first, int64_t last) {
    std::vector<float> k(d);
    for (int64_t task = first; task < last; task++) {
      const int64_t b = task / a.kv_heads, g = task % a.kv_heads;
      if (a.positions[b] < 0) continue;
      const int64_t t = std::min<int64_t>(a.positions[b], a.table_len - 1);
      rope(a.qkv + b * width + a.heads * d + g * d, a.cos + t * d, a.sin + t * d, d, 1.0f, k.data());
      store_new_token(b, g, k.data());
    }
  });

  // (sequence, KV head, part) items in runs from a shared counter (pool.h: a descheduled thread delays one run only)
  parallel_runs(a.threads, items, [&](int64_t first, int64_t last) {
    std::vector<float> q(groups * d), k(d), scores(groups * (capacity + 1)), single(parts > 1 ? 0 : 2 * groups + groups * d);
    for (int64_t item = first; item < last; item++) {
      const int64_t task = item / parts, part = item % parts;
      const int64_t b = task / a.kv_heads, g = task % a.kv_heads;
      const int64_t pos = std::max<int32_t>(a.positions[b], 0);
      const int64_t len = std::min<int64_t>(pos, capacity);  // cached positions this token attends to
      // this part's blocks [blk0, blk1) of the sequence's (len + bs - 1) / bs; the part of its last block (part 0
      // for an empty cache) also has the new token; the parts past them are empty
      const int64_t nblk = (len + bs - 1) / bs, blk0 = std::min(part * PART_BLOCKS, nblk);
      const int64_t blk1 = std::min((part + 1) * PART_BLOCKS, nblk);
      const bool self = part == (nblk > 0 ? (nblk - 1) / PART_BLOCKS : 0);
      if (blk0 == blk1 && !self) {  // nothing here: merged as nothing (its largest score is -inf)
        std::fill(part_max.begin() + item * groups, part_max.begin() + (item + 1) * groups, -INFINITY);
        continue;
      }
      const int64_t t = std::min<int64_t>(pos, a.table_len - 1);
      const int32_t *table = a.block_index + b * a.blocks;
      const float *row = a.qkv + b * width, *cos = a.cos + t * d, *sin = a.sin + t * d;
      for (int64_t i = 0; i < groups; i++) rope(row + (g * groups + i) * d, cos, sin, d, scale, q.data() + i * d);
      const int64_t lo = blk0 * bs, hi = std::min(len, blk1 * bs);  // positions [lo, hi)
      const int64_t span = capacity + 1;  // scores of one query head: the cached positions, then the new token

      // Scores against the cache, block by block: K^T rows are contiguous in the position within a block.
      for (int64_t blk = blk0; blk < blk1; blk++) {
        const float *kb = a.k_pool + (int64_t(table[blk]) * a.kv_heads + g) * d * bs;
        const int64_t base = blk * bs, n = std::min(bs, len - base);
        // The keys KEY_BLOCKS_AHEAD blocks on and this block's values are elsewhere in the pool, in no order the
        // hardware prefetcher could guess: ask for them now, not when the loops reach them (one block at a time
        // left each block's first lines waiting on memory: 8 GB/s of the machine's 30).
        for (int64_t ahead = blk == blk0 ? 1 : KEY_BLOCKS_AHEAD; ahead <= KEY_BLOCKS_AHEAD; ahead++)
          if (blk + ahead < blk1)
            prefetch_lines(a.k_pool + (int64_t(table[blk + ahead]) * a.kv_heads + g) * d * bs, d * bs);
        prefetch_lines(a.v_pool + (int64_t(table[blk]) * a.kv_heads + g) * bs * d, bs * d);
        if (bs == BLOCK_VECTORS * W && n == bs) {
          for (int64_t i = 0; i < groups; i += 4)
            block_scores_rows(kb, d, q.data() + i * d, scores.data() + i * span + base, span, std::min<int64_t>(4, groups - i));
          continue;
        }
        for (int64_t i = 0; i < groups; i++) {
          float *sc = scores.data() + i * span + base;
          for (int64_t j = 0; j < n; j++) {
            float dot = 0.0f;
            for (int64_t e = 0; e < d; e++) dot += q[i * d + e] * kb[e * bs + j];
            sc[j] = dot;
          }
        }
      }
      if (self) rope(row + a.heads * d + g * d, cos, sin, d, 1.0f, k.data());
      float *maxes = parts > 1 ? part_max.data() + item * groups : single.data();
      float *sums_out = parts > 1 ? part_sum.data() + item * groups : single.data() + groups;
      float *out = parts > 1 ? part_out.data() + item * groups * d : single.data() + 2 * groups;
      for (int64_t i = 0; i < groups; i++) {
        float *s = scores.data() + i * span;
        if (self) {
          float dot = 0.0f;
          for (int64_t e = 0; e < d; e++) dot += q[i * d + e] * k[e];
          s[len] = dot;  // the new token itself, after the cached ones
        }
        float top = -INFINITY;
        for (int64_t j = lo; j < hi; j++) top = std::max(top, s[j]);
        if (self) top = std::max(top, s[len]);
        float total = 0.0f;
        if (top > -INFINITY) {
          vf sums{};
          int64_t j = lo;
          for (; j + W <= hi; j += W) {
            const vf p = vexp(load<vf>(s + j) - top);
            store(s + j, p);
            sums += p;
          }
          total = hsum(sums);
          for (; j < hi; j++) total += (s[j] = std::exp(s[j] - top));
          if (self) total += (s[len] = std::exp(s[len] - top));
        }
        maxes[i] = top;
        sums_out[i] = total;
      }
      // o over positions [lo, hi): the weights of positions before lo are never read (p points at lo)
      if (hi > lo) {
        weighted_values_heads(a.v_pool, table + blk0, a.kv_heads, g, bs, d, hi - lo, scores.data() + lo, span, groups,
                              out);
      } else {
        std::fill(out, out + groups * d, 0.0f);
      }
      if (self) {
        const float *v = row + (a.heads + a.kv_heads) * d + g * d;
        for (int64_t i = 0; i < groups; i++) {
          const float w = scores[i * span + len];
          for (int64_t e = 0; e < d; e++) out[i * d + e] += w * v[e];
        }
      }
      if (parts == 1) {  // the whole task: normalize into a.out
        for (int64_t i = 0; i < groups; i++) {
          const float inv = 1.0f / sums_out[i];
          float *dst = a.out + b * a.heads * d + (g * groups + i) * d;
          for (int64_t e = 0; e < d; e++) dst[e] = out[i * d + e] * inv;
        }
      }
    }
  });
  if (parts == 1) return;

  // Pass 2 (sequences cut into parts): merge the parts, normalize.
  parallel_runs(a.threads, tasks, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; task++) {
      const int64_t b = task / a.kv_heads, g = task % a.kv_heads;
      for (int64_t i = 0; i < groups; i++) {
        float top = -INFINITY;
        for (int64_t part = 0; part < parts; part++) top = std::max(top, part_max[(task * parts + part) * groups + i]);
        float total = 0.0f;
        float *dst = a.out + b * a.heads * d + (g * groups + i) * d;
        std::fill(dst, dst + d, 0.0f);
        for (int64_t part = 0; part < parts; part++) {
          const int64_t item = task * parts + part;
          const float m = part_max[item * groups + i];
          if (m == -INFINITY) continue;
          const float w = std::exp(m - top);
          total += w * part_sum[item * groups + i];
          const float *o = part_out.data() + (item * groups + i) * d;
          for (int64_t e = 0; e < d; e++) dst[e] += w * o[e];
        }
        const float inv = 1.0f / total;
        for (int64_t e = 0; e < d; e++) dst[e] *= inv;
      }
    }
  });
}

}  // namespace MST_NS
