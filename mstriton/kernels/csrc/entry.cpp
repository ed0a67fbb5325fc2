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
//   MstDecodeStep        a whole decode step, its weights in one blob (see MstDecodeStep)
// with <F> one of F32 BF16 INT8 Q8_0 Q4_0 Q4_1 Q8_0X8 Q4_0X8 Q4_1X8 Q4_K Q5_K Q6_K. A bias is told from a residual by its rank (1).
//
// Threads: MSTRITON_KERNEL_THREADS, else the CPUs this process may run on (the kernels' own pool, pool.h). ISA: the best the CPU has, or MSTRITON_KERNEL_ISA
// (avx512, avx2, generic). Activations of the products: MSTRITON_KERNEL_ACTIVATIONS=float32 (the default, exact) or
// int8 (qlinear.h: Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K products as integer dot products, decode and
// prefill).
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdio>
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
// int8 activations (qlinear.h): every object has them with vpmaddubsw (generic: plain C++); the SIMD objects also
// with vpdpbusd (VNNI), called only where the CPU has it.
#define DECLARE_INT8(ns)                                                                                         \
  namespace ns {                                                                                                  \
  bool linear_int8(const LinearArgs &);                                                                          \
  void quantize_rows(const float *, int64_t, int64_t, int8_t *, float *, float *, int);                          \
  double int8_peak(int, int64_t);                                                                                \
  }
DECLARE_INT8(mst_avx512)
DECLARE_INT8(mst_avx2)
DECLARE_INT8(mst_generic)
namespace mst_avx512 {
bool linear_int8_vnni(const LinearArgs &);
double int8_peak_vnni(int, int64_t);
}
namespace mst_avx2 {
bool linear_int8_vnni(const LinearArgs &);
double int8_peak_vnni(int, int64_t);
}

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

// The integer dot products of the int8-activation products, each in the object of its `base` ISA: by default the
// best the CPU has within the chosen ISA's object (VNNI first).
struct Int8Isa {
  const char *name, *base;
  bool (*linear)(const LinearArgs &);  // false: not a product it takes (the float32 path does it)
  void (*quantize_rows)(const float *, int64_t, int64_t, int8_t *, float *, float *, int);
  double (*peak)(int, int64_t);  // GMAC/s of its block dots on every thread
};
const Int8Isa INT8_ISAS[] = {
    {"avx512vnni", "avx512", mst_avx512::linear_int8_vnni, mst_avx512::quantize_rows, mst_avx512::int8_peak_vnni},
    {"avx512", "avx512", mst_avx512::linear_int8, mst_avx512::quantize_rows, mst_avx512::int8_peak},
    {"avxvnni", "avx2", mst_avx2::linear_int8_vnni, mst_avx2::quantize_rows, mst_avx2::int8_peak_vnni},
    {"avx2", "avx2", mst_avx2::linear_int8, mst_avx2::quantize_rows, mst_avx2::int8_peak},
    {"generic", "generic", mst_generic::linear_int8, mst_generic::quantize_rows, mst_generic::int8_peak}};

bool supported(const Int8Isa &dots) {
  for (const Isa &base : ISAS)
    if (!std::strcmp(base.name, dots.base) && !supported(base)) return false;
  __builtin_cpu_init();
  if (!std::strcmp(dots.name, "avx512vnni")) return __builtin_cpu_supports("avx512vnni");
  if (!std::strcmp(dots.name, "avxvnni")) return __builtin_cpu_supports("avxvnni");
  return true;
}

const Int8Isa *current_int8 = nullptr;  // null: the best for the current ISA
const Int8Isa &int8_isa() {
  for (const Int8Isa &dots : INT8_ISAS)
    if (!current_int8 && !std::strcmp(dots.base, isa().name) && supported(dots)) current_int8 = &dots;
  return current_int8 ? *current_int8 : INT8_ISAS[4];
}

// 0: float32 activations (linear.h, exact: the default), 1: int8 (qlinear.h). Read once from the environment.
int activations = -1;
int activations_mode() {
  if (activations < 0) {
    const char *env = std::getenv("MSTRITON_KERNEL_ACTIVATIONS");
    activations = env && !std::strcmp(env, "int8") ? 1 : 0;
    if (env && *env && std::strcmp(env, "int8") && std::strcmp(env, "float32"))
      std::fprintf(stderr, "mstriton kernels: MSTRITON_KERNEL_ACTIVATIONS=%s is neither int8 nor float32: float32\n",
                   env);
  }
  return activations;
}

// Every weight product of the entry points.
void product(const LinearArgs &a) {
  if (activations_mode() == 1 && int8_isa().linear(a)) return;
  isa().linear(a);
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
// A weight matrix of n rows of row_bytes bytes holds k values per row in this format (an interleaved one also
// needs whole groups of 8 rows).
bool matrix_fits(int format, int64_t n, int64_t bytes, int64_t k) {
  return bytes == row_bytes(format, k) && whole_groups(format, n);
}

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
  if (!matrix_fits(format, a.n, shapes[w][1], a.k)) return 2;
  if (pre == PRE_RMSNORM) {
    a.norm = static_cast<const float *>(params[1]);
    a.eps = *static_cast<const float *>(params[2]);
  }
  optional_terms(nparam, params, ndims, w + 1, &a);
  a.y = static_cast<float *>(params[y]);
  a.threads = threads();
  product(a);
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
    if (!matrix_fits(F, shapes[1][0], shapes[1][1], e)) return 2;                                               \
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
LINEAR_OPS(Q8_0X8)
LINEAR_OPS(Q4_0X8)
LINEAR_OPS(Q4_1X8)
LINEAR_OPS(Q4_K)
LINEAR_OPS(Q5_K)
LINEAR_OPS(Q6_K)

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

// The weights and sizes of one decoder layer without biases, its four matrices in one format.
struct LayerWeights {
  int format;
  const float *attention_norm, *ffn_norm;  // [E]
  const uint8_t *wqkv, *wo, *w_gate_up, *w_down;
};
struct LayerDims {
  int64_t e, heads, dim, ffn;
};

// Where a decode step's time goes, by stage (mst_step_profile; on with mst_set_step_profile(1), off by default:
// two clock reads per stage): for finding what keeps a step above its memory floor.
enum Stage : int { STAGE_QKV, STAGE_ATTENTION, STAGE_O, STAGE_GATE_UP, STAGE_DOWN, STAGE_HEAD, STAGE_COUNT };
std::atomic<bool> profiling{false};
std::atomic<int64_t> stage_ns[STAGE_COUNT];
template <class F>
static inline void staged(Stage stage, F &&f) {
  if (!profiling.load(std::memory_order_relaxed)) return f();
  const auto start = std::chrono::steady_clock::now();
  f();
  stage_ns[stage] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
}

// One decoder layer over `rows` rows: x [rows, E] -> out [rows, E] (may not alias x). `a` holds the attention's
// paged-cache arguments for this layer (its block index rows, positions, rotary tables, pools).
static void decode_layer(const LayerWeights &w, const LayerDims &s, float eps, const float *x, float *out,
                         int64_t rows, AttentionArgs a) {
  const Isa &kernels = isa();
  const int t = threads();
  const int64_t width = (s.heads + 2 * a.kv_heads) * s.dim;
  float *qkv = static_cast<float *>(mst_scratch(2, rows * std::max(width, 2 * s.ffn) * sizeof(float)));
  float *attention = static_cast<float *>(mst_scratch(3, rows * s.heads * s.dim * sizeof(float)));
  a.qkv = qkv;
  a.out = attention;
  staged(STAGE_QKV, [&] {
    product(LinearArgs{w.format, PRE_RMSNORM, x, rows, s.e, w.attention_norm, eps, w.wqkv, width, nullptr,
            nullptr, qkv, t});
  });
  staged(STAGE_ATTENTION, [&] { kernels.decode_attention(a); });
  staged(STAGE_O, [&] {
    product(LinearArgs{w.format, PRE_NONE, attention, rows, s.heads * s.dim, nullptr, 0.0f, w.wo, s.e, nullptr,
            x, out, t});
  });
  float *gate_up = qkv;  // q/k/v are used up
  staged(STAGE_GATE_UP, [&] {
    product(LinearArgs{w.format, PRE_RMSNORM, out, rows, s.e, w.ffn_norm, eps, w.w_gate_up, 2 * s.ffn, nullptr,
            nullptr, gate_up, t});
  });
  // the residual is the output itself: each element is read, then written, by one thread
  staged(STAGE_DOWN, [&] {
    product(LinearArgs{w.format, PRE_SWIGLU, gate_up, rows, s.ffn, nullptr, 0.0f, w.w_down, s.e, nullptr, out,
            out, t});
  });
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
  if (heads <= 0 || heads % kv || !matrix_fits(format, shapes[10][0], shapes[10][1], e) ||
      !matrix_fits(format, shapes[11][0], shapes[11][1], heads * d) ||
      !matrix_fits(format, shapes[13][0], shapes[13][1], e) || !matrix_fits(format, shapes[14][0], shapes[14][1], ffn) ||
      shapes[11][0] != e || shapes[14][0] != e)
    return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float eps = *static_cast<const float *>(params[9]);
  float *out = static_cast<float *>(params[15]);
  AttentionArgs a{};
  if (!paged_attention_args(params, shapes, dtypes, 4, heads * d, nullptr, &a) || index_rows(shapes, 4) != b)
    return 2;
  std::memset(out + a.batch * e, 0, (b - a.batch) * e * sizeof(float));  // padding rows: zeros, not computed
  const LayerWeights w{format,
                       static_cast<const float *>(params[8]),
                       static_cast<const float *>(params[12]),
                       static_cast<const uint8_t *>(params[10]),
                       static_cast<const uint8_t *>(params[11]),
                       static_cast<const uint8_t *>(params[13]),
                       static_cast<const uint8_t *>(params[14])};
  decode_layer(w, LayerDims{e, heads, d, ffn}, eps, x, out, a.batch, a);
  return 0;
}

// A whole decode step in one call: the embedding, every layer and the LM head, with the weights in one blob.
//   tokens [B] int32, positions [B] int32, cos, sin, k_pool, v_pool, block_index [L, B, blocks] int32,
//   layout [n] int32, eps [1], blob uint8 [bytes], lm_head uint8 [V, row_bytes]  ->  logits [B, V]
// layout (written by mstriton/kernels/formats.py:step_layout): a header STEP_HEADER = {version, layers, E, heads,
// kv_heads, head_dim, ffn, vocab}, then for each weight in the engine's order (per layer attention_norm, wqkv, wo,
// ffn_norm, w_gate_up, w_down; then embed_tokens, norm, lm_head) its offset in the blob in 64-byte units and its
// format (-1: float32 values). lm_head is also an input of its own (a view of the blob): its shape gives the
// logits' width to shape inference. Why: a graph input costs MindSpore some microseconds per call, and a step of
// SmolLM2 took 190 weight inputs and 32 operator launches; this takes 7 inputs and one launch.
constexpr int STEP_HEADER = 8, STEP_LAYER_WEIGHTS = 6, STEP_VERSION = 1;
extern "C" int MstDecodeStep(AOT_ARGS) {
  (void)ndims;
  Timed timed;
  if (nparam != 12 || !is(dtypes[0], "int32") || !is(dtypes[7], "int32") || !is(dtypes[9], "uint8") ||
      !is(dtypes[10], "uint8"))
    return 1;
  const int32_t *layout = static_cast<const int32_t *>(params[7]);
  const int64_t n_layout = shapes[7][0];
  if (n_layout < STEP_HEADER || layout[0] != STEP_VERSION) return 2;
  const int64_t layers = layout[1], e = layout[2], heads = layout[3], kv = layout[4], d = layout[5], ffn = layout[6],
                vocab = layout[7];
  if (n_layout != STEP_HEADER + 2 * (layers * STEP_LAYER_WEIGHTS + 3) || shapes[6][0] != layers ||
      shapes[4][1] != kv || shapes[4][2] != d || shapes[10][0] != vocab)
    return 2;
  const uint8_t *blob = static_cast<const uint8_t *>(params[9]);
  const int64_t blob_bytes = shapes[9][0];
  auto entry = [&](int64_t i, int64_t k_width, int64_t n_rows, const void **where, int *format) {
    const int32_t *slot = layout + STEP_HEADER + 2 * i;
    const int64_t offset = int64_t(slot[0]) * 64;
    *format = slot[1];
    const int64_t bytes = *format < 0 ? k_width * 4 : n_rows * row_bytes(*format, k_width);
    *where = blob + offset;
    return offset >= 0 && bytes > 0 && offset + bytes <= blob_bytes && *format < FORMAT_COUNT &&
           (*format < 0 || whole_groups(*format, n_rows));
  };
  const int64_t b = shapes[0][0];
  float *logits = static_cast<float *>(params[11]);
  AttentionArgs a{};
  a.positions = static_cast<const int32_t *>(params[1]);
  a.cos = static_cast<const float *>(params[2]);
  a.sin = static_cast<const float *>(params[3]);
  a.k_pool = static_cast<float *>(params[4]);
  a.v_pool = static_cast<float *>(params[5]);
  a.batch = shapes[6][1];
  a.blocks = shapes[6][2];
  a.kv_heads = kv;
  a.dim = d;
  a.block_size = shapes[4][3];
  a.heads = heads;
  a.table_len = shapes[2][0];
  a.threads = threads();
  if (a.batch != b || heads % kv || shapes[2][1] != d) return 2;
  // padding rows of a batch bucket (position -1, after the sequences): no work, zero logits
  while (a.batch > 0 && a.positions[a.batch - 1] < 0) a.batch--;
  const int64_t rows = a.batch;
  std::memset(logits + rows * vocab, 0, (b - rows) * vocab * sizeof(float));
  if (rows == 0) return 0;
  const float eps = *static_cast<const float *>(params[8]);
  thread_local std::vector<float> ping, pong;
  ping.resize(rows * e);
  pong.resize(rows * e);
  const void *embed_table, *final_norm, *head;
  int embed_format, norm_format, head_format;
  const int64_t globals = layers * STEP_LAYER_WEIGHTS;
  if (!entry(globals, e, vocab, &embed_table, &embed_format) || !entry(globals + 1, e, 1, &final_norm, &norm_format) ||
      !entry(globals + 2, e, vocab, &head, &head_format) || embed_format < 0 || head_format < 0 || norm_format >= 0 ||
      head != params[10])
    return 2;
  isa().embed(embed_format, static_cast<const int32_t *>(params[0]), rows, static_cast<const uint8_t *>(embed_table),
              vocab, e, ping.data());
  const LayerDims dims{e, heads, d, ffn};
  const int64_t width = (heads + 2 * kv) * d;
  for (int64_t l = 0; l < layers; l++) {
    const void *p[STEP_LAYER_WEIGHTS];
    int f[STEP_LAYER_WEIGHTS];
    const int64_t k_of[STEP_LAYER_WEIGHTS] = {e, e, heads * d, e, e, ffn};
    const int64_t n_of[STEP_LAYER_WEIGHTS] = {1, width, e, 1, 2 * ffn, e};
    for (int j = 0; j < STEP_LAYER_WEIGHTS; j++)
      if (!entry(l * STEP_LAYER_WEIGHTS + j, k_of[j], n_of[j], &p[j], &f[j])) return 2;
    if (f[0] >= 0 || f[3] >= 0 || f[1] < 0 || f[2] != f[1] || f[4] != f[1] || f[5] != f[1]) return 2;
    const LayerWeights w{f[1],
                         static_cast<const float *>(p[0]),
                         static_cast<const float *>(p[3]),
                         static_cast<const uint8_t *>(p[1]),
                         static_cast<const uint8_t *>(p[2]),
                         static_cast<const uint8_t *>(p[4]),
                         static_cast<const uint8_t *>(p[5])};
    AttentionArgs layer = a;
    layer.block_index = static_cast<const int32_t *>(params[6]) + l * b * a.blocks;
    decode_layer(w, dims, eps, ping.data(), pong.data(), rows, layer);
    std::swap(ping, pong);
  }
  staged(STAGE_HEAD, [&] {
    product(LinearArgs{head_format, PRE_RMSNORM, ping.data(), rows, e, static_cast<const float *>(final_norm), eps,
            static_cast<const uint8_t *>(head), vocab, nullptr, nullptr, logits, threads()});
  });
  return 0;
}
extern "C" std::vector<int64_t> MstDecodeStepInferShape(int *, int64_t **shapes, AotExtra *) {
  return {shapes[0][0], shapes[10][0]};
}
extern "C" TypeId MstDecodeStepInferType(std::vector<TypeId> types, AotExtra *) { return types[2]; }

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
DECODE_LAYER(Q8_0X8)
DECODE_LAYER(Q4_0X8)
DECODE_LAYER(Q4_1X8)
DECODE_LAYER(Q4_K)
DECODE_LAYER(Q5_K)
DECODE_LAYER(Q6_K)

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
      current_int8 = nullptr;  // the int8 products follow
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
// Seconds per stage of the decode steps since the last call (qkv, attention, o, gate_up, down, head: out[6]);
// resets them. mst_set_step_profile(1) turns the clock on.
void mst_set_step_profile(int on) { profiling = on != 0; }
void mst_step_profile(double *out) {
  for (int i = 0; i < STAGE_COUNT; i++) out[i] = double(stage_ns[i].exchange(0)) * 1e-9;
}
void mst_set_threads(int n) { thread_count = n > 0 ? n : default_threads(); }
int64_t mst_row_bytes(int format, int64_t k) { return row_bytes(format, k); }

int mst_linear(int format, int pre, const float *x, int64_t m, int64_t k, const float *norm, float eps,
               const uint8_t *w, int64_t n, const float *bias, const float *residual, float *y) {
  if (format < 0 || format >= FORMAT_COUNT || pre < PRE_NONE || pre > PRE_SWIGLU) return 1;
  if (!whole_groups(format, n)) return 2;
  LinearArgs a{format, pre, x, m, k, norm, eps, w, n, bias, residual, y, threads()};
  product(a);
  return 0;
}

// Activations of the products: 0 float32, 1 int8 (as MSTRITON_KERNEL_ACTIVATIONS). Returns 0, or -1 if unknown.
int mst_activations() { return activations_mode(); }
int mst_set_activations(int mode) {
  if (mode != 0 && mode != 1) return -1;
  activations = mode;
  return 0;
}

// The integer dot products the int8 products use (avx512vnni, avx512, avxvnni, avx2, generic); choosing one (tests)
// returns 0, or -1 if unknown or unsupported. mst_set_isa goes back to the best for the ISA it sets.
const char *mst_int8_isa() { return int8_isa().name; }
int mst_set_int8_isa(const char *name) {
  for (const Int8Isa &dots : INT8_ISAS)
    if (!std::strcmp(dots.name, name) && supported(dots)) {
      current_int8 = &dots;
      return 0;
    }
  return -1;
}
int mst_int8_isa_supported(const char *name) {
  for (const Int8Isa &dots : INT8_ISAS)
    if (!std::strcmp(dots.name, name)) return supported(dots);
  return 0;
}

// x [m, k] quantized as the int8 products do: q [m, kp] int8, d and s [m, kp / 32] (kp: k rounded up to 32).
int mst_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *d, float *s) {
  const int64_t kp = blocks_of(k) * 32;
  std::vector<float> padded(m * kp, 0.0f);
  for (int64_t r = 0; r < m; r++) std::memcpy(padded.data() + r * kp, x + r * k, k * sizeof(float));
  int8_isa().quantize_rows(padded.data(), m, kp, q, d, s, threads());
  return 0;
}

int mst_embed(int format, const int32_t *tokens, int64_t count, const uint8_t *table, int64_t vocab, int64_t e,
              float *out) {
  if (format < 0 || format >= FORMAT_COUNT) return 1;
  if (!whole_groups(format, vocab)) return 2;
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
// GMAC/s of int8 multiply-adds by the int8 products' dot products (mst_int8_isa) on every thread.
double mst_int8_peak(int64_t iterations) { return int8_isa().peak(threads(), iterations); }

}  // extern "C"
