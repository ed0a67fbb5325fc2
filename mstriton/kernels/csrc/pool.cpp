// The thread pool of pool.h.
#include "pool.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// A worker spins hard for SPIN_SECONDS after its last task (longer than the gap between two kernel calls of a
// step), then yields its core on every check until YIELD_SECONDS, then sleeps. Yielding matters when several
// processes run kernels on few cores (tritonserver's prefill and decode models): a worker spinning flat out
// for milliseconds took the core from the other process's kernels (measured: served throughput at 16 streams
// fell below the float32 path's).
constexpr double SPIN_SECONDS = 0.0001;
constexpr double YIELD_SECONDS = 0.002;
constexpr int MAX_THREADS = 256;
// `joined` of a task of runs: the workers inside it, and this bit once its caller has taken the last run.
constexpr int CLOSED = 1 << 30;

struct Pool {
  std::atomic<uint64_t> generation{0};  // bumped once per task
  std::mutex busy;                      // one task at a time
  std::mutex sleep_mu;                  // with `wake`, for workers past their spin
  std::condition_variable wake;
  std::atomic<int> sleeping{0};
  std::vector<std::thread> workers;

  // The current task, written by its caller before the generation bump. Either fixed shares: fn(ctx, t, n) for
  // every t, the caller waiting for `pending` workers; or runs: fn_runs(ctx, begin, end) over [0, count) in runs
  // taken from `next`, where the caller waits only for the workers that joined before it closed the task.
  std::atomic<bool> runs{false};
  void (*fn)(void *, int, int) = nullptr;
  void (*fn_runs)(void *, int64_t, int64_t) = nullptr;
  void *ctx = nullptr;
  int n = 1;
  int64_t count = 0, run = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int> pending{0};
  std::atomic<int> joined{CLOSED};  // closed: no task of runs yet

  void take_runs() {
    for (int64_t begin; (begin = next.fetch_add(run, std::memory_order_relaxed)) < count;)
      fn_runs(ctx, begin, std::min(begin + run, count));
  }

  // A task of runs, from a worker that saw generation `seen`: join it unless it is closed or already another.
  void join_runs(uint64_t seen) {
    if (joined.fetch_add(1, std::memory_order_acq_rel) & CLOSED) {
      joined.fetch_sub(1, std::memory_order_acq_rel);
      return;
    }
    // Joined and not closed: the caller waits for us, so the task cannot change under us from here on
    // (unless it had already changed before we joined).
    if (generation.load(std::memory_order_acquire) == seen && runs.load(std::memory_order_relaxed)) take_runs();
    joined.fetch_sub(1, std::memory_order_acq_rel);
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      const auto idle_since = std::chrono::steady_clock::now();
      uint64_t now;
      int spins = 0;
      bool yielding = false;
      while ((now = generation.load(std::memory_order_acquire)) == seen) {
        if (yielding) {
          std::this_thread::yield();
        } else {
          _mm_pause();
        }
        if (++spins % (yielding ? 16 : 256) != 0) continue;
        const double idle =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - idle_since).count();
        yielding = idle > SPIN_SECONDS;
        if (idle > YIELD_SECONDS) {
          std::unique_lock<std::mutex> lock(sleep_mu);
          sleeping.fetch_add(1);
          wake.wait(lock, [&] { return generation.load(std::memory_order_acquire) != seen; });
          sleeping.fetch_sub(1);
        }
      }
      seen = now;
      if (runs.load(std::memory_order_relaxed)) {
        join_runs(now);
      } else if (generation.load(std::memory_order_acquire) == now && index < n) {
        // fixed shares: the caller waits for every worker, so the task is still this one
        fn(ctx, index, n);
        pending.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  void grow(int threads) {
    while (int(workers.size()) + 1 < threads) {
      const int index = int(workers.size()) + 1;
      workers.emplace_back([this, index] { work(index); });
      workers.back().detach();
    }
  }

  void publish() {
    generation.fetch_add(1, std::memory_order_acq_rel);
    if (sleeping.load() > 0) {
      std::lock_guard<std::mutex> guard(sleep_mu);
      wake.notify_all();
    }
  }

  // The pool for one task of `threads` threads, workers grown to that; false (the caller works alone) when another
  // thread's task holds it or there is nothing to share. `lock` then holds the pool for the task.
  bool claim(std::unique_lock<std::mutex> &lock, int &threads) {
    lock = std::unique_lock<std::mutex>(busy, std::try_to_lock);
    if (!lock.owns_lock() || threads <= 1) return false;
    threads = std::min(threads, MAX_THREADS);
    grow(threads);
    return true;
  }

  void run_shares(int threads, void (*f)(void *, int, int), void *c) {
    std::unique_lock<std::mutex> lock;
    if (!claim(lock, threads)) {
      f(c, 0, 1);
      return;
    }
    runs.store(false, std::memory_order_relaxed);
    fn = f;
    ctx = c;
    n = threads;
    pending.store(threads - 1, std::memory_order_relaxed);
    publish();
    f(c, 0, threads);
    while (pending.load(std::memory_order_acquire) > 0) _mm_pause();
  }

  void run_runs(int threads, int64_t items, int64_t size, void (*f)(void *, int64_t, int64_t), void *c) {
    std::unique_lock<std::mutex> lock;
    if (!claim(lock, threads)) {
      f(c, 0, items);
      return;
    }
    runs.store(true, std::memory_order_relaxed);
    fn_runs = f;
    ctx = c;
    count = items;
    run = size;
    next.store(0, std::memory_order_relaxed);
    // Open the task after writing its fields (a worker that joins sees them). Only the bit is cleared, never the
    // count: a worker late for the last task may be between its join and its leave right now, and resetting
    // the count under it left the count at -1, so that this wait spun forever (seen in a test server).
    joined.fetch_and(~CLOSED, std::memory_order_acq_rel);
    publish();
    take_runs();
    // Every run is taken: close the task, then wait for the runs still in progress. A worker that had not
    // joined yet (descheduled, or asleep) finds it closed and does nothing; nobody waits for it.
    joined.fetch_or(CLOSED, std::memory_order_acq_rel);
    while ((joined.load(std::memory_order_acquire) & ~CLOSED) != 0) _mm_pause();
  }
};

// Never destroyed: its detached workers outlive static destructors, and they run this library's code between
// calls (spinning, yielding, or asleep in the wait loop) until the process ends. So the library itself must never
// be unmapped: it is linked with -z nodelete (Makefile), because MindSpore dlcloses an AOT operator's library when
// its last kernel goes (a collected graph, interpreter shutdown), and a worker then returned from sched_yield into
// unmapped memory (SIGSEGV, issue 25).
Pool &pool() {
  static Pool *instance = new Pool();
  return *instance;
}

}  // namespace

extern "C" void mst_parallel(int n, void (*fn)(void *, int, int), void *ctx) { pool().run_shares(n, fn, ctx); }

extern "C" void mst_parallel_runs(int threads, int64_t count, int64_t run, void (*fn)(void *, int64_t, int64_t),
                                  void *ctx) {
  pool().run_runs(threads, count, run, fn, ctx);
}

extern "C" void *mst_scratch(int slot, uint64_t bytes) {
  struct Buffer {
    void *data = nullptr;
    uint64_t size = 0;
  };
  thread_local Buffer buffers[4];
  Buffer &b = buffers[slot & 3];
  if (b.size < bytes) {
    std::free(b.data);
    b.size = (bytes + 4095) / 4096 * 4096;
    b.data = std::aligned_alloc(64, b.size);
  }
  return b.data;
}
