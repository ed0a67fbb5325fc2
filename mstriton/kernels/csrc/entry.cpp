// libmstriton_kernels.so: run-time ISA dispatch, the MindSpore AOT custom-operator entry points and their C++
// shape/type inference (needed for graphs with dynamic dimensions to load from MindIR), and a plain C API for the
// unit tests and benchmarks (ctypes).
//
// AOT operators (inputs, then outputs; every weight matrix is uint8 [N, row_bytes], formats.h):
//   MstLinear_<F>        x [..., K], w [, bias [N]] [, residual [..., N]]          -> y [..., N]
//   MstNormLinear_<F>    x [..., K], norm [K], eps [1], w [, bias [N]]             -> y [..., N]   (RMSNorm first)
//   MstSwigluLinear_<F>  x [..., 2K], w [, bias [N]] [, residual [..., N]]         -> y [..., N]   (silu(g) * u first)
//   MstEmbed_<F>         tokens [...] int32, table [V, row_bytes], like [E] float32 -> [..., E]
//   MstDecodeAttention   qkv, positions, cos, sin, k_pool, v_pool, block_index, layer -> out; K/V into the pool
//   MstDecodeLayerInPlace_<F>   a whole decoder layer of a decode step (see run_decode_layer)
// with <F> one of F32 BF16 INT8 Q8_0 Q4_0 Q4_1. A bias is told from a residual by its rank (1).
//
// Threads: MSTRITON_KERNEL_THREADS, else the CPUs this process may run on (the kernels' own pool, pool.h). ISA: the best the CPU has, or MSTRITON_KERNEL_ISA
// (avx512, avx2, generic).
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <algorithm>

#include "args.h"
#include "formats.h"
#include "pool.h"

#define DECLARE_ISA(ns)                                                                                          \
  namespace ns {                                                                                                  \
  void linear(const LinearArgs &);                                                                               \
  void embed(int, const int32_t *, int64_t, const uint8_t *, int64_t, int64_t, float *);                         \
  void decode_attention(const AttentionArgs &);                                                                  \
  double read_bandwidth(const float *, int64_t, int, int);                                                        \
  double fma_peak(int, int64_t);                                                                                 \
  }
DECLARE_ISA(mst_avx512)
DECLARE_ISA(mst_avx2)
DECLARE_ISA(mst_generic)

namespace {

struct Isa {
  const char *name;
  void (*linear)(const LinearArgs &);
  void (*embed)(int, const int32_t *, int64_t, const uint8_t *, int64_t, int64_t, float *);
  void (*decode_attention)(const AttentionArgs &);
  double (*read_bandwidth)(const float *, int64_t, int, int);
  double (*fma_peak)(int, int64_t);
};

#define ISA_ENTRY(label, ns) \
  Isa { label, ns::linear, ns::embed, ns::decode_attention, ns::read_bandwidth, ns::fma_peak }
const Isa ISAS[] = {ISA_ENTRY("avx512", mst_avx512), ISA_ENTRY("avx2", mst_avx2), ISA_ENTRY("generic", mst_generic)};

bool supported(const Isa &isa) {
  __builtin_cpu_init();
  if (!std::strcmp(isa.name, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (!std::strcmp(isa.name, "avx2"))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return true;
}

const Isa *best_isa() {
  const char *wanted = std::getenv("MSTRITON_KERNEL_ISA");
  for (const Isa &isa : ISAS)
    if (supported(isa) && (!wanted || !*wanted || !std::strcmp(wanted, isa.name))) return &isa;
  return &ISAS[2];
}

const Isa *current = nullptr;
const Isa &isa() {
  if (!current) current = best_isa();
  return *current;
}

int default_threads() {
  if (const char *env = std::getenv("MSTRITON_KERNEL_THREADS"); env && std::atoi(env) > 0) return std::atoi(env);
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  return 1;
}
int thread_count = 0;
int threads() {
  if (!thread_count) thread_count = default_threads();
  return thread_count;
}

// Time spent inside the AOT entry points and their count, for profiles (mst_kernel_time): the share of a graph
// call that is the kernels' own work, the rest being MindSpore's.
std::atomic<int64_t> kernel_ns{0}, kernel_calls{0};
struct Timed {
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  ~Timed() {
    kernel_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    kernel_calls += 1;
  }
};

int64_t elements(int ndim, const int64_t *shape, int upto) {
  int64_t n = 1;
  for (int i = 0; i < upto && i < ndim; i++) n *= shape[i];
  return n;
}

bool is(const char *dtype, const char *name) { return dtype && !std::strcmp(dtype, name); }

// The optional bias / residual inputs between `first` and the output (the last param).
void optional_terms(int nparam, void **params, int *ndims, int first, LinearArgs *a) {
  for (int i = first; i < nparam - 1; i++) {
    if (ndims[i] == 1)
      a->bias = static_cast<const float *>(params[i]);
    else
      a->residual = static_cast<const float *>(params[i]);
  }
}

int run_linear(int format, int pre, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Timed timed;
  const int x = 0, w = pre == PRE_RMSNORM ? 3 : 1, y = nparam - 1;
  if (!is(dtypes[x], "float32") || !is(dtypes[w], "uint8") || ndims[w] != 2) return 1;
  LinearArgs a{};
  a.format = format;
  a.pre = pre;
  a.x = static_cast<const float *>(params[x]);
  a.k = shapes[x][ndims[x] - 1] / (pre == PRE_SWIGLU ? 2 : 1);
  a.m = elements(ndims[x], shapes[x], ndims[x] - 1);
  a.w = static_cast<const uint8_t *>(params[w]);
  a.n = shapes[w][0];
  if (shapes[w][1] != row_bytes(format, a.k)) return 2;  // the matrix is not K values per row in this format
  if (pre == PRE_RMSNORM) {
    a.norm = static_cast<const float *>(params[1]);
    a.eps = *static_cast<const float *>(params[2]);
  }
  optional_terms(nparam, params, ndims, w + 1, &a);
  a.y = static_cast<float *>(params[y]);
  a.threads = threads();
  isa().linear(a);
  return 0;
}

std::vector<int64_t> linear_shape(int *ndims, int64_t **shapes, int w) {
  if (ndims[0] > 0 && shapes[0][0] == -2) return {-2};  // unknown rank
  std::vector<int64_t> out(shapes[0], shapes[0] + ndims[0]);
  out.back() = shapes[w][0];
  return out;
}

}  // namespace

struct AotExtra;      // MindSpore's; only passed through
enum TypeId : int {};  // MindSpore's type ids; only passed through

#define AOT_ARGS int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *
#define LINEAR_OPS(F)                                                                                            \
  extern "C" int MstLinear_##F(AOT_ARGS) { return run_linear(F, PRE_NONE, nparam, params, ndims, shapes, dtypes); } \
  extern "C" std::vector<int64_t> MstLinear_##F##InferShape(int *ndims, int64_t **shapes, AotExtra *) {            \
    return linear_shape(ndims, shapes, 1);                                                                       \
  }                                                                                                             \
  extern "C" TypeId MstLinear_##F##InferType(std::vector<TypeId> types, AotExtra *) { return types[0]; }          \
  extern "C" int MstNormLinear_##F(AOT_ARGS) {                                                                   \
    return run_linear(F, PRE_RMSNORM, nparam, params, ndims, shapes, dtypes);                                   \
  }                                                                                                             \
  extern "C" std::vector<int64_t> MstNormLinear_##F##InferShape(int *ndims, int64_t **shapes, AotExtra *) {        \
    return linear_shape(ndims, shapes, 3);                                                                       \
  }                                                                                                             \
  extern "C" TypeId MstNormLinear_##F##InferType(std::vector<TypeId> types, AotExtra *) { return types[0]; }      \
  extern "C" int MstSwigluLinear_##F(AOT_ARGS) {                                                                 \
    return run_linear(F, PRE_SWIGLU, nparam, params, ndims, shapes, dtypes);                                    \
  }                                                                                                             \
  extern "C" std::vector<int64_t> MstSwigluLinear_##F##InferShape(int *ndims, int64_t **shapes, AotExtra *) {      \
    return linear_shape(ndims, shapes, 1);                                                                       \
  }                                                                                                             \
  extern "C" TypeId MstSwigluLinear_##F##InferType(std::vector<TypeId> types, AotExtra *) { return types[0]; }    \
  extern "C" int MstEmbed_##F(AOT_ARGS) {                                                                        \
    (void)nparam;                                                                                                \
    Timed timed;                                                                                                 \
    if (!is(dtypes[0], "int32") || !is(dtypes[1], "uint8")) return 1;                                            \
    const int64_t e = shapes[2][0];                                                                               \
    if (shapes[1][1] != row_bytes(F, e)) return 2;                                                               \
    isa().embed(F, static_cast<const int32_t *>(params[0]), elements(ndims[0], shapes[0], ndims[0]),               \
                static_cast<const uint8_t *>(params[1]), shapes[1][0], e, static_cast<float *>(params[3]));       \
    return 0;                                                                                                    \
  }                                                                                                             \
  extern "C" std::vector<int64_t> MstEmbed_##F##InferShape(int *ndims, int64_t **shapes, AotExtra *) {             \
    if (ndims[0] > 0 && shapes[0][0] == -2) return {-2};                                                         \
    std::vector<int64_t> out(shapes[0], shapes[0] + ndims[0]);                                                   \
    out.push_back(shapes[2][0]);                                                                                 \
    return out;                                                                                                  \
  }                                                                                                             \
  extern "C" TypeId MstEmbed_##F##InferType(std::vector<TypeId> types, AotExtra *) { return types[2]; }

LINEAR_OPS(F32)
LINEAR_OPS(BF16)
LINEAR_OPS(INT8)
LINEAR_OPS(Q8_0)
LINEAR_OPS(Q4_0)
LINEAR_OPS(Q4_1)

// Rows of the batch the block index [L, B, blocks] at input `pool` + 2 was made for.
static int64_t index_rows(int64_t **shapes, int pool) { return shapes[pool + 2][1]; }

// The paged-cache arguments of decode attention from an operator's inputs: qkv at 0, positions at 1, cos, sin at
// 2, 3, and from `pool` on: k_pool [R, Hkv, D, bs], v_pool [R, Hkv, bs, D], block_index [L, B, blocks] int32 and
// layer [1] int32 (which layer's rows of the index this call reads). False if the shapes disagree.
static bool paged_attention_args(void **params, int64_t **shapes, const char **dtypes, int pool, int64_t heads_width,
                                 float *out, AttentionArgs *a) {
  if (!is(dtypes[pool], "float32") || !is(dtypes[pool + 2], "int32") || !is(dtypes[pool + 3], "int32")) return false;
  const int64_t *k = shapes[pool], *v = shapes[pool + 1], *index = shapes[pool + 2];
  a->qkv = nullptr;
  a->positions = static_cast<const int32_t *>(params[1]);
  a->cos = static_cast<const float *>(params[2]);
  a->sin = static_cast<const float *>(params[3]);
  a->k_pool = static_cast<float *>(params[pool]);
  a->v_pool = static_cast<float *>(params[pool + 1]);
  const int32_t layer = *static_cast<const int32_t *>(params[pool + 3]);
  a->batch = index[1];
  a->blocks = index[2];
  if (layer < 0 || layer >= index[0]) return false;
  a->block_index = static_cast<const int32_t *>(params[pool + 2]) + int64_t(layer) * a->batch * a->blocks;
  a->kv_heads = k[1];
  a->dim = k[2];
  a->block_size = k[3];
  a->heads = heads_width / a->dim;
  a->table_len = shapes[2][0];
  a->out = out;
  a->threads = threads();
  // The engine marks the padding rows of a batch bucket (after its sequences) with position -1: no work for
  // them (17 sequences run in the 32-row graph; the 15 padding rows would nearly double a step's products).
  while (a->batch > 0 && a->positions[a->batch - 1] < 0) a->batch--;
  return a->heads > 0 && a->heads % a->kv_heads == 0 && v[0] == k[0] && v[1] == k[1] && v[2] == k[3] &&
         v[3] == k[2] && shapes[2][1] == a->dim;
}

extern "C" int MstDecodeAttention(AOT_ARGS) {
  (void)ndims;
  Timed timed;
  if (nparam != 9 || !is(dtypes[0], "float32") || !is(dtypes[1], "int32")) return 1;
  AttentionArgs a{};
  const int64_t kv = shapes[4][1], d = shapes[4][2];
  if (!paged_attention_args(params, shapes, dtypes, 4, shapes[0][1] - 2 * kv * d, static_cast<float *>(params[8]), &a))
    return 2;
  a.qkv = static_cast<const float *>(params[0]);
  if (a.batch > shapes[0][0] || index_rows(shapes, 4) != shapes[0][0]) return 2;
  float *out = static_cast<float *>(params[8]);
  const int64_t row = shapes[0][1] - 2 * kv * d;
  std::memset(out + a.batch * row, 0, (shapes[0][0] - a.batch) * row * sizeof(float));  // padding rows
  isa().decode_attention(a);
  return 0;
}

// One whole decoder layer of a decode step (a model without biases, its four matrices in one format):
//   x [B, E], positions, cos, sin, k_pool, v_pool, block_index, layer, attention_norm [E], eps [1], wqkv, wo,
//   ffn_norm [E], w_gate_up, w_down  ->  x_out [B, E]
// the same five steps as the separate operators (norm + q/k/v, attention, o-projection + residual, norm +
// gate/up, SwiGLU + down + residual) in one call: each MindSpore kernel launch costs tens of microseconds on
// this CPU, and a step of 30 layers made 150 of them. The new token's K and V go straight into the pool (the
// caller's memory, passed zero-copy).
int run_decode_layer(int format, int nparam, void **params, int64_t **shapes, const char **dtypes) {
  Timed timed;
  if (nparam != 16 || !is(dtypes[0], "float32") || !is(dtypes[10], "uint8")) return 1;
  const int64_t b = shapes[0][0], e = shapes[0][1], kv = shapes[4][1], d = shapes[4][2];
  const int64_t width = shapes[10][0], heads = width / d - 2 * kv, ffn = shapes[13][0] / 2;
  if (heads <= 0 || heads % kv || shapes[10][1] != row_bytes(format, e) ||
      shapes[11][1] != row_bytes(format, heads * d) || shapes[13][1] != row_bytes(format, e) ||
      shapes[14][1] != row_bytes(format, ffn) || shapes[11][0] != e || shapes[14][0] != e)
    return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float eps = *static_cast<const float *>(params[9]);
  float *out = static_cast<float *>(params[15]);
  float *qkv = static_cast<float *>(mst_scratch(2, b * std::max(width, 2 * ffn) * sizeof(float)));
  float *attention = static_cast<float *>(mst_scratch(3, b * heads * d * sizeof(float)));
  AttentionArgs a{};
  if (!paged_attention_args(params, shapes, dtypes, 4, heads * d, attention, &a) || index_rows(shapes, 4) != b)
    return 2;
  a.qkv = qkv;
  const Isa &kernels = isa();
  const int t = threads();
  std::memset(out + a.batch * e, 0, (b - a.batch) * e * sizeof(float));  // padding rows: zeros, not computed
  const int64_t rows = a.batch;
  kernels.linear(LinearArgs{format, PRE_RMSNORM, x, rows, e, static_cast<const float *>(params[8]), eps,
                            static_cast<const uint8_t *>(params[10]), width, nullptr, nullptr, qkv, t});
  kernels.decode_attention(a);
  kernels.linear(LinearArgs{format, PRE_NONE, attention, rows, heads * d, nullptr, 0.0f,
                            static_cast<const uint8_t *>(params[11]), e, nullptr, x, out, t});
  float *gate_up = qkv;  // q/k/v are used up
  kernels.linear(LinearArgs{format, PRE_RMSNORM, out, rows, e, static_cast<const float *>(params[12]), eps,
                            static_cast<const uint8_t *>(params[13]), 2 * ffn, nullptr, nullptr, gate_up, t});
  // the residual is the output itself: each element is read, then written, by one thread
  kernels.linear(LinearArgs{format, PRE_SWIGLU, gate_up, rows, ffn, nullptr, 0.0f,
                            static_cast<const uint8_t *>(params[14]), e, nullptr, out, out, t});
  return 0;
}

#define DECODE_LAYER(F)                                                                                          \
  extern "C" int MstDecodeLayerInPlace_##F(AOT_ARGS) {                                                           \
    (void)ndims;                                                                                                 \
    return run_decode_layer(F, nparam, params, shapes, dtypes);                                                  \
  }                                                                                                             \
  extern "C" std::vector<int64_t> MstDecodeLayerInPlace_##F##InferShape(int *, int64_t **shapes, AotExtra *) {    \
    return {shapes[0][0], shapes[0][1]};                                                                         \
  }                                                                                                             \
  extern "C" TypeId MstDecodeLayerInPlace_##F##InferType(std::vector<TypeId> types, AotExtra *) { return types[0]; }
DECODE_LAYER(F32)
DECODE_LAYER(BF16)
DECODE_LAYER(INT8)
DECODE_LAYER(Q8_0)
DECODE_LAYER(Q4_0)
DECODE_LAYER(Q4_1)

extern "C" std::vector<int64_t> MstDecodeAttentionInferShape(int *, int64_t **shapes, AotExtra *) {
  const int64_t kv = shapes[4][1], d = shapes[4][2];
  return {shapes[0][0], shapes[0][1] < 0 ? -1 : shapes[0][1] - 2 * kv * d};
}
extern "C" TypeId MstDecodeAttentionInferType(std::vector<TypeId> types, AotExtra *) { return types[0]; }

// ---- C API (ctypes) -----------------------------------------------------------------------------------------

extern "C" {

const char *mst_isa() { return isa().name; }

// Choose an ISA by name (tests run every one the CPU supports). Returns 0, or -1 if unknown or unsupported.
int mst_set_isa(const char *name) {
  for (const Isa &candidate : ISAS)
    if (!std::strcmp(candidate.name, name) && supported(candidate)) {
      current = &candidate;
      return 0;
    }
  return -1;
}

int mst_isa_supported(const char *name) {
  for (const Isa &candidate : ISAS)
    if (!std::strcmp(candidate.name, name)) return supported(candidate);
  return 0;
}

int mst_threads() { return threads(); }

// Seconds spent inside the AOT entry points since the last call, and how many calls; resets both.
double mst_kernel_time(int64_t *calls) {
  *calls = kernel_calls.exchange(0);
  return double(kernel_ns.exchange(0)) * 1e-9;
}
void mst_set_threads(int n) { thread_count = n > 0 ? n : default_threads(); }
int64_t mst_row_bytes(int format, int64_t k) { return row_bytes(format, k); }

int mst_linear(int format, int pre, const float *x, int64_t m, int64_t k, const float *norm, float eps,
               const uint8_t *w, int64_t n, const float *bias, const float *residual, float *y) {
  if (format < 0 || format >= FORMAT_COUNT || pre < PRE_NONE || pre > PRE_SWIGLU) return 1;
  LinearArgs a{format, pre, x, m, k, norm, eps, w, n, bias, residual, y, threads()};
  isa().linear(a);
  return 0;
}

int mst_embed(int format, const int32_t *tokens, int64_t count, const uint8_t *table, int64_t vocab, int64_t e,
              float *out) {
  if (format < 0 || format >= FORMAT_COUNT) return 1;
  isa().embed(format, tokens, count, table, vocab, e, out);
  return 0;
}

// Decode attention over a paged cache for one layer (block_index [B, blocks], that layer's rows); writes the new
// K/V into the pool.
int mst_decode_attention(const float *qkv, const int32_t *positions, const float *cos, const float *sin,
                         int64_t table_len, float *k_pool, float *v_pool, const int32_t *block_index, int64_t blocks,
                         int64_t block_size, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, float *out) {
  AttentionArgs a{qkv, positions, cos, sin, k_pool, v_pool, block_index, out,
                  batch, heads, kv_heads, dim, blocks, block_size, table_len, threads()};
  isa().decode_attention(a);
  return 0;
}

double mst_read_bandwidth(const float *buf, int64_t count, int reps) {
  return isa().read_bandwidth(buf, count, threads(), reps);
}
double mst_fma_peak(int64_t iterations) { return isa().fma_peak(threads(), iterations); }

}  // extern "C"
