// PLAID's centroid interaction (stages 4-5) on the CPU, called from XLA programs through the XLA FFI.
//
// For each candidate document d (rows starts[d] .. starts[d] + lens[d] of the index):
//   acc[q] = max over its rows r whose centroid c = codes[r] is kept (max_q' S[c, q'] >= threshold)
//            of S[c, q], and MASKED_SCORE when none is kept;
//   score[d] = sum_q acc[q]  (-inf for an empty document: the sentinel candidate).
// The same numbers as `colbert_jax.search.pruning.approx_streamed`; what differs is the memory traffic:
// each row of S is read once per embedding straight into a running maximum, without XLA:CPU's
// gather + scatter-max over materialised [chunk, Lq] blocks.
//
// Operands carry an optional leading batch axis (vmap with `expand_dims`): S [B|1, P, Lq], codes [B|1, R],
// threshold [B|1], starts and lens [B|1, n] -> scores [B, n].

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <functional>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMasked = -9999.0f;  // colbert_jax.scoring.MASKED_SCORE
constexpr int64_t kMaxQueryTokens = 1024;
constexpr int64_t kDocsPerTask = 64;
constexpr int64_t kRowsPerThread = 32768;  // below this many rows per thread, one thread does it all
constexpr int kPrefetch = 8;

template <typename Code>
void ScoreDocs(const float* S, int64_t num_centroids, int64_t lq, const Code* codes, int64_t num_rows,
               const int32_t* starts, const int32_t* lens, float threshold, float* out, int64_t lo, int64_t hi) {
  alignas(64) float acc[kMaxQueryTokens];
  const bool prune = threshold > -std::numeric_limits<float>::infinity();
  for (int64_t d = lo; d < hi; ++d) {
    const int64_t len = lens[d];
    const int64_t start = starts[d];
    if (len <= 0 || start < 0 || start + len > num_rows) {
      out[d] = -std::numeric_limits<float>::infinity();
      continue;
    }
    std::fill(acc, acc + lq, kMasked);
    const Code* c = codes + start;
    for (int64_t r = 0; r < len; ++r) {
      if (r + kPrefetch < len) {
        const int64_t ahead = static_cast<int64_t>(c[r + kPrefetch]);
        if (ahead < num_centroids) __builtin_prefetch(S + ahead * lq);
      }
      const int64_t code = static_cast<int64_t>(c[r]);
      if (code < 0 || code >= num_centroids) continue;  // padding: never part of a document
      const float* row = S + code * lq;
      if (prune) {
        float m = row[0];
        for (int64_t q = 1; q < lq; ++q) m = std::max(m, row[q]);
        if (!(m >= threshold)) continue;
      }
      for (int64_t q = 0; q < lq; ++q) acc[q] = std::max(acc[q], row[q]);
    }
    float sum = 0.0f;
    for (int64_t q = 0; q < lq; ++q) sum += acc[q];
    out[d] = sum;
  }
}

// Runs fn(task) for task in [0, tasks) on the calling thread and up to `helpers` pool threads. Tasks are
// claimed from a shared counter, so the caller finishes everything itself if the pool is busy; state lives
// on the heap because a pool thread may start after the caller has returned.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t tasks = 0;
  std::mutex mu;
  std::condition_variable cv;
};

template <typename Fn>
void RunTasks(ffi::ThreadPool& pool, int64_t tasks, int64_t helpers, Fn fn) {
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

template <ffi::DataType CodeType>
ffi::Error CentroidInteraction(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> S, ffi::Buffer<CodeType> codes,
                               ffi::Buffer<ffi::F32> threshold, ffi::Buffer<ffi::S32> starts,
                               ffi::Buffer<ffi::S32> lens, ffi::ResultBuffer<ffi::F32> out) {
  using Code = ffi::NativeType<CodeType>;
  auto s_dims = S.dimensions();
  auto c_dims = codes.dimensions();
  auto n_dims = starts.dimensions();
  if (s_dims.size() < 2 || c_dims.size() < 1 || n_dims.size() < 1) {
    return ffi::Error::InvalidArgument("centroid_interaction: S needs [..., P, Lq], codes [..., R], starts [..., n]");
  }
  const int64_t num_centroids = s_dims[s_dims.size() - 2];
  const int64_t lq = s_dims[s_dims.size() - 1];
  const int64_t num_rows = c_dims[c_dims.size() - 1];
  const int64_t n = n_dims[n_dims.size() - 1];
  if (lq > kMaxQueryTokens) return ffi::Error::InvalidArgument("centroid_interaction: more than 1024 query tokens");
  const int64_t batch = n > 0 ? out->element_count() / n : 0;
  const int64_t s_batch = S.element_count() / std::max<int64_t>(num_centroids * lq, 1);
  const int64_t c_batch = codes.element_count() / std::max<int64_t>(num_rows, 1);
  const int64_t t_batch = threshold.element_count();
  const int64_t st_batch = n > 0 ? starts.element_count() / n : 0;
  const int64_t ln_batch = n > 0 ? lens.element_count() / n : 0;
  if (lens.dimensions().back() != n) {
    return ffi::Error::InvalidArgument("centroid_interaction: starts and lens differ in length");
  }
  for (int64_t b_size : {s_batch, c_batch, t_batch, st_batch, ln_batch}) {
    if (b_size != 1 && b_size != batch) {
      return ffi::Error::InvalidArgument("centroid_interaction: the operands' batch axes differ");
    }
  }
  const float* s_data = S.typed_data();
  const Code* c_data = codes.typed_data();
  const float* t_data = threshold.typed_data();
  const int32_t* st = starts.typed_data();
  const int32_t* ln = lens.typed_data();
  float* o = out->typed_data();

  int64_t rows = 0;
  for (int64_t i = 0; i < ln_batch * n; ++i) rows += std::max<int32_t>(ln[i], 0);
  if (ln_batch == 1) rows *= batch;
  const int64_t per_query_tasks = (n + kDocsPerTask - 1) / kDocsPerTask;
  const int64_t tasks = batch * per_query_tasks;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t helpers = std::min<int64_t>({threads - 1, rows / kRowsPerThread, tasks - 1});
  auto task = [=](int64_t t) {
    const int64_t b = t / per_query_tasks;
    const int64_t lo = (t % per_query_tasks) * kDocsPerTask;
    const int64_t hi = std::min<int64_t>(lo + kDocsPerTask, n);
    ScoreDocs<Code>(s_data + (s_batch == 1 ? 0 : b) * num_centroids * lq, num_centroids, lq,
                    c_data + (c_batch == 1 ? 0 : b) * num_rows, num_rows, st + (st_batch == 1 ? 0 : b) * n,
                    ln + (ln_batch == 1 ? 0 : b) * n,
                    t_data[t_batch == 1 ? 0 : b], o + b * n, lo, hi);
  };
  if (helpers <= 0) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    RunTasks(pool, tasks, helpers, task);
  }
  return ffi::Error::Success();
}

}  // namespace

#define COLBERT_JAX_BIND(CODE)                  \
  ffi::Ffi::Bind()                              \
      .Ctx<ffi::ThreadPool>()                   \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<CODE>>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<ffi::S32>>()             \
      .Arg<ffi::Buffer<ffi::S32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxCentroidInteractionS32, CentroidInteraction<ffi::S32>,
                              COLBERT_JAX_BIND(ffi::S32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxCentroidInteractionU16, CentroidInteraction<ffi::U16>,
                              COLBERT_JAX_BIND(ffi::U16));
