// A parallel-for over XLA:CPU's intra-op thread pool, shared by the native kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace colbert_jax_native {

// Runs fn(task) for task in [0, tasks) on the calling thread and, when there are `rows` rows to process, one
// pool thread per `rows_per_thread` of them (up to the pool's size). Tasks are claimed from a shared counter,
// so the caller finishes everything itself if the pool is busy; state lives on the heap because a pool thread
// may start after the caller has returned.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t tasks = 0;
  std::mutex mu;
  std::condition_variable cv;
};

template <typename Fn>
inline void RunTasks(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t rows, int64_t rows_per_thread, Fn fn) {
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t helpers = std::min<int64_t>({threads - 1, rows / rows_per_thread, tasks - 1});
  if (helpers <= 0) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  auto work = std::make_shared<Work>();
  work->tasks = tasks;
  auto drain = [work, fn]() {
    int64_t t;
    while ((t = work->next.fetch_add(1)) < work->tasks) {
      fn(t);
      if (work->done.fetch_add(1) + 1 == work->tasks) {
        std::lock_guard<std::mutex> lock(work->mu);
        work->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(std::function<void()>(drain));
  drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->tasks; });
}

}  // namespace colbert_jax_native
