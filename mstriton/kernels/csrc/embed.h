// Embedding lookup from a weight matrix of any format: out[t, :] = dequantized row tokens[t] of table [V, E].
// A tied model's embedding table is its LM head, so with this the packed head serves both and no float32 copy
// of the table is kept.
#pragma once

#include <algorithm>

#include "decode.h"

namespace MST_NS {

template <class D>
static void embed_rows(int format, const int32_t *tokens, int64_t count, const uint8_t *table, int64_t vocab,
                       int64_t e, float *out) {
  const int64_t rb = row_bytes(format, e), nb = blocks_of(e);
  for (int64_t t = 0; t < count; t++) {
    int64_t token = tokens[t];
    if (token < 0 || token >= vocab) token = 0;  // the tokenizer model validated ids; never read outside the table
    float *y = out + t * e;
    for (int64_t b = 0; b < nb; b++) {
      vf v[NV];
      decode_block<D>(table, rb, token, b, e, v);
      alignas(64) float block[QK];
      for (int j = 0; j < NV; j++) store(block + j * W, v[j]);
      const int64_t n = std::min<int64_t>(QK, e - b * QK);
      std::memcpy(y + b * QK, block, n * sizeof(float));
    }
  }
}

void embed(int format, const int32_t *tokens, int64_t count, const uint8_t *table, int64_t vocab, int64_t e,
           float *out) {
  switch (format) {
    case F32: return embed_rows<DecodeF32>(format, tokens, count, table, vocab, e, out);
    case BF16: return embed_rows<DecodeBF16>(format, tokens, count, table, vocab, e, out);
    case INT8: return embed_rows<DecodeINT8>(format, tokens, count, table, vocab, e, out);
    case Q8_0: return embed_rows<DecodeQ8_0>(format, tokens, count, table, vocab, e, out);
    case Q4_0: return embed_rows<DecodeQ4_0>(format, tokens, count, table, vocab, e, out);
    case Q4_1: return embed_rows<DecodeQ4_1>(format, tokens, count, table, vocab, e, out);
    case Q8_0X8: return embed_rows<X8<DecodeQ8_0, Q8_0X8>>(format, tokens, count, table, vocab, e, out);
    case Q4_0X8: return embed_rows<X8<DecodeQ4_0, Q4_0X8>>(format, tokens, count, table, vocab, e, out);
    case Q4_1X8: return embed_rows<X8<DecodeQ4_1, Q4_1X8>>(format, tokens, count, table, vocab, e, out);
    case Q4_K: return embed_rows<DecodeQ4_K>(format, tokens, count, table, vocab, e, out);
    case Q5_K: return embed_rows<DecodeQ5_K>(format, tokens, count, table, vocab, e, out);
    case Q6_K: return embed_rows<DecodeQ6_K>(format, tokens, count, table, vocab, e, out);
  }
}

}  // namespace MST_NS
