// The machine's floors, measured by the same code paths as the kernels: read bandwidth and float32 FMA peak.
// bench-engine reports every kernel against these, measured in the same run.
#pragma once

#include <chrono>
#include <vector>

#include "pool.h"

#include "vec.h"

namespace MST_NS {

// GB/s of reading `bytes` (a buffer far larger than the caches), summed so the reads cannot be skipped.
double read_bandwidth(const float *buf, int64_t count, int threads, int reps) {
  double best = 0.0;
  volatile float sink = 0.0f;
  for (int rep = 0; rep < reps; rep++) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<float> totals(threads, 0.0f);
    parallel(threads, [&](int t, int nt) {
      const int64_t lo = count / W * t / nt * W, hi = count / W * (t + 1) / nt * W;
      vf a0{}, a1{}, a2{}, a3{};
      for (int64_t i = lo; i + 4 * W <= hi; i += 4 * W) {
        a0 += load<vf>(buf + i);
        a1 += load<vf>(buf + i + W);
        a2 += load<vf>(buf + i + 2 * W);
        a3 += load<vf>(buf + i + 3 * W);
      }
      totals[t] = hsum(a0 + a1 + a2 + a3);
    });
    for (float v : totals) sink = sink + v;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(count) * 4 / seconds / 1e9);
  }
  return best;
}

// GFLOP/s of independent FMA chains in registers on every thread (2 flops per lane per FMA).
double fma_peak(int threads, int64_t iterations) {
  const auto start = std::chrono::steady_clock::now();
  std::vector<float> totals(threads, 0.0f);
  parallel(threads, [&](int t, int) {
    vf acc[12];
    for (int i = 0; i < 12; i++) acc[i] = splat(float(i) * 1e-3f);
    const vf m = splat(0.999999f), c = splat(1e-7f);
    for (int64_t it = 0; it < iterations; it++)
      for (int i = 0; i < 12; i++) acc[i] = acc[i] * m + c;
    vf s{};
    for (int i = 0; i < 12; i++) s += acc[i];
    totals[t] = hsum(s);
  });
  float total = 0.0f;
  for (float v : totals) total += v;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float sink = total;
  (void)sink;
  return double(threads) * iterations * 12 * W * 2 / seconds / 1e9;
}

}  // namespace MST_NS
