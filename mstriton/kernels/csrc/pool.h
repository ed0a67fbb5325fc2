// The kernels' own thread pool: workers that spin between calls, so that each kernel call of a decode step
// starts in well under a microsecond.
//
// Why not OpenMP: libgomp's workers fall asleep between parallel regions, and waking them through a futex took
// about 100 us per call on this VM (measured: 120 chained 576 x 576 products ran at 2 GB/s, per call overhead
// dominating), which put a decode step at several times its memory floor. Here a worker spins (with pause)
// briefly after its last task, then yields its core between checks for a while, then sleeps on a condition
// variable (pool.cpp has the times); a call made while the pool is busy (two MindSpore kernel threads at once)
// runs on its caller's thread alone.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

// Run fn(ctx, t, n) for t in [0, n) on n threads (the caller is thread 0); n is capped at the pool's size.
extern "C" void mst_parallel(int n, void (*fn)(void *, int, int), void *ctx);

// Grow-only scratch memory of the calling thread, 64-byte aligned; `slot` tells buffers of one call apart.
extern "C" void *mst_scratch(int slot, uint64_t bytes);

template <class F>
static inline void parallel(int threads, F &&f) {
  auto trampoline = [](void *ctx, int t, int n) { (*static_cast<F *>(ctx))(t, n); };
  mst_parallel(threads, trampoline, &f);
}

// Items [0, count) in runs of `run` items, fn(ctx, begin, end), on up to `threads` threads: the caller and the
// workers take runs from a shared counter. The call returns once every run is done, waiting only for the workers
// that joined in time; a worker that wakes after the caller took the last run does nothing.
extern "C" void mst_parallel_runs(int threads, int64_t count, int64_t run, void (*fn)(void *, int64_t, int64_t),
                                  void *ctx);

// f(begin, end) over [0, count) in runs of about count / (threads * RUNS_PER_THREAD) items (mst_parallel_runs).
// Why not fixed shares: on a machine whose few cores the kernels share with other processes (tritonserver, the
// front model), one of the threads is often descheduled in the middle of a call, or still waking. With fixed
// shares the whole call waits for that thread's half; here the others take the remaining runs, and the call
// waits at most for a run already in progress.
constexpr int64_t RUNS_PER_THREAD = 4;

template <class F>
static inline void parallel_runs(int threads, int64_t count, F &&f) {
  if (count <= 0) return;
  const int64_t run = std::max<int64_t>(1, count / (std::max(threads, 1) * RUNS_PER_THREAD));
  auto trampoline = [](void *ctx, int64_t begin, int64_t end) { (*static_cast<F *>(ctx))(begin, end); };
  mst_parallel_runs(threads, count, run, trampoline, &f);
}
