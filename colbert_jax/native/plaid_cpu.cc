// PLAID's centroid interaction (stages 4-5) and exact MaxSim (stage 6) on the CPU, called from XLA programs
// through the XLA FFI.
//
// Centroid interaction:
// For each candidate document d (rows starts[d] .. starts[d] + lens[d] of the index):
//   acc[q] = max over its rows r whose centroid c = codes[r] is kept (max_q' S[c, q'] >= threshold)
//            of S[c, q], and MASKED_SCORE when none is kept;
//   score[d] = sum_q acc[q]  (-inf for an empty document: the sentinel candidate).
// The same numbers as `colbert_jax.search.pruning.approx_streamed`; what differs is the memory traffic:
// each row of S is read once per embedding straight into a running maximum, without XLA:CPU's
// gather + scatter-max over materialised [chunk, Lq] blocks.
//
// Operands carry an optional leading batch axis (vmap with `expand_dims`): S [B|1, P, Lq], codes [B|1, R],
// threshold [B|1], starts and lens [B|1, n] -> scores [B, n]. S is float32, or float16 (stage 1 on int8
// operands), each score then read as its float32 value.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <functional>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <mutex>
#include <vector>

#include "amx.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::RunTasks;

constexpr float kMasked = -9999.0f;  // colbert_jax.scoring.MASKED_SCORE
constexpr int64_t kMaxQueryTokens = 1024;
constexpr int64_t kDocsPerTask = 64;
constexpr int64_t kRowsPerThread = 32768;  // below this many rows per thread, one thread does it all
constexpr int64_t kMaxDim = 1024;
constexpr int64_t kMaxSimRowsPerThread = 2048;  // rows cost far more here than in the interaction

// 16 floats as one vector (GCC/Clang vector extensions: AVX-512 registers where the CPU has them, split
// into narrower ones elsewhere). Elementwise `a > b ? a : b` is the maximum the compiler vectorises;
// std::max's reference-returning form compiles to a compare and branch per element.
typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Vec16Mask __attribute__((vector_size(64)));  // a comparison's lanes: all ones or zero
constexpr int kLanes = 16;

inline Vec16 Load(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }

inline Vec16 Max(Vec16 a, Vec16 b) { return a > b ? a : b; }

// A float buffer whose start is 64-byte aligned, so that each 16-float row a kernel loads from it is one cache line
// (new float[] gave 16-byte alignment: every such load spanned two lines, and stage 6's table lookups ran slower).
struct FreeFloats {
  void operator()(float* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeFloats>;
inline AlignedFloats NewAlignedFloats(int64_t n) {
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 16) * 4 + 63) / 64 * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (p == nullptr) throw std::bad_alloc();  // as new float[] did
  return AlignedFloats(p);
}

inline float Max(float a, float b) { return a > b ? a : b; }

// *p in every lane, as one broadcast load. (`Vec16{} + x` must add 0.0 first, since -0.0 + 0.0 is +0.0, and
// then broadcasts from a register on a port the FMAs need: in stage 6, 4 adds and 4 shuffles per 8 FMAs.)
inline Vec16 Splat(const float* p) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(*p);
#else
  const float x = *p;
  Vec16 v;
  for (int i = 0; i < kLanes; ++i) v[i] = x;
  return v;
#endif
}

// acc[q] = max(acc[q], row[q]) for q < n.
inline void MaxInto(float* acc, const float* row, int64_t n) {
  int64_t q = 0;
  for (; q + kLanes <= n; q += kLanes) Store(acc + q, Max(Load(acc + q), Load(row + q)));
  for (; q < n; ++q) acc[q] = Max(acc[q], row[q]);
}

// Whether any of a row's n scores is >= threshold (that is, its largest one).
inline bool AnyAtLeast(const float* row, int64_t n, float threshold) {
  int64_t q = 0;
#if defined(__AVX512F__)
  const __m512 t = _mm512_set1_ps(threshold);
  __mmask16 any = 0;
  for (; q + kLanes <= n; q += kLanes) any |= _mm512_cmp_ps_mask(_mm512_loadu_ps(row + q), t, _CMP_GE_OQ);
  if (any) return true;
#endif
  for (; q < n; ++q) {
    if (row[q] >= threshold) return true;
  }
  return false;
}

// S held as float16 (stage 1 on int8 operands: `centroid_scores_int8`), its rows read as float32.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    const float f = std::ldexp(static_cast<float>(man), -24);
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 16 float16 scores as float32 (`vcvtph2ps` where the CPU has it).
inline Vec16 LoadHalf(const uint16_t* p) {
#if defined(__AVX512F__)
  return (Vec16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  Vec16 v;
  for (int i = 0; i < kLanes; ++i) v[i] = HalfToFloat(p[i]);
  return v;
#endif
}

// acc[q] = max(acc[q], row[q]) for a float16 row.
inline void MaxInto(float* acc, const uint16_t* row, int64_t n) {
  int64_t q = 0;
  for (; q + kLanes <= n; q += kLanes) Store(acc + q, Max(Load(acc + q), LoadHalf(row + q)));
  for (; q < n; ++q) acc[q] = Max(acc[q], HalfToFloat(row[q]));
}

inline bool AnyAtLeast(const uint16_t* row, int64_t n, float threshold) {
  int64_t q = 0;
#if defined(__AVX512F__)
  const __m512 t = _mm512_set1_ps(threshold);
  __mmask16 any = 0;
  for (; q + kLanes <= n; q += kLanes) any |= _mm512_cmp_ps_mask((__m512)LoadHalf(row + q), t, _CMP_GE_OQ);
  if (any) return true;
#endif
  for (; q < n; ++q) {
    if (HalfToFloat(row[q]) >= threshold) return true;
  }
  return false;
}

// One row of MASKED_SCORE for every query token: a pruned centroid's row, as ScoreDocs reads it (from L1).
struct MaskedRow {
  alignas(64) float scores[kMaxQueryTokens];
  MaskedRow() { std::fill(scores, scores + kMaxQueryTokens, kMasked); }
};
const MaskedRow kMaskedRow;

// The same for float16 rows: -inf, which leaves a running maximum as MASKED_SCORE's row does (each maximum
// starts at MASKED_SCORE, below every score), since MASKED_SCORE itself is no float16 value.
struct MaskedHalfRow {
  alignas(64) uint16_t scores[kMaxQueryTokens];
  MaskedHalfRow() { std::fill(scores, scores + kMaxQueryTokens, static_cast<uint16_t>(0xfc00)); }
};
const MaskedHalfRow kMaskedHalfRow;

inline const float* MaskedScores(const float*) { return kMaskedRow.scores; }
inline const uint16_t* MaskedScores(const uint16_t*) { return kMaskedHalfRow.scores; }

// PLAID's pruning as the interaction reads it: S [P, lq]'s rows with a score >= threshold copied, in order, into
// `table` after one row of masked scores (row 0), and slot[c] = centroid c's row there (0: pruned, the masked
// row). A candidate's rows mostly come from pruned centroids and read the masked row, from L1; the kept rows
// are a few percent of S and come from this small table, in L2, instead of from S's rows scattered over L3 or
// memory. The same scores as S's rows: the same sums.
template <typename T>
void KeptRows(const T* S, int64_t num_centroids, int64_t lq, float threshold, int32_t* slot, std::vector<T>& table) {
  const T* masked = MaskedScores(S);
  table.assign(masked, masked + lq);
  int32_t next = 1;
  for (int64_t c = 0; c < num_centroids; ++c) {
    const T* row = S + c * lq;
    if (AnyAtLeast(row, lq, threshold)) {
      slot[c] = next++;
      table.insert(table.end(), row, row + lq);
    } else {
      slot[c] = 0;
    }
  }
}

// A centroid's row as the interaction reads it: from the kept rows' table where S was pruned (slot not null),
// else S's own row.
template <typename T>
inline const T* InteractionRow(const T* S, const T* table, const int32_t* slot, int64_t lq, int64_t code) {
  return slot == nullptr ? S + code * lq : table + static_cast<int64_t>(slot[code]) * lq;
}

constexpr int64_t kPrefetchDocs = 6;  // documents ahead whose codes ScoreDocs requests

// Requests the lines holding document d's codes: its first four lines and its last (none for an invalid
// range). always_inline: GCC 12 took this helper, whose only effect is `__builtin_prefetch`, for one without
// effects and dropped its calls.
template <typename Code>
__attribute__((always_inline)) inline void PrefetchCodes(const Code* codes, int64_t num_rows, const int32_t* starts,
                                                         const int32_t* lens, int64_t d) {
  const int64_t start = starts[d], len = lens[d];
  if (len <= 0 || start < 0 || start + len > num_rows) return;
  const char* first = reinterpret_cast<const char*>(codes + start);
  const char* last = reinterpret_cast<const char*>(codes + start + len) - 1;
  __builtin_prefetch(first);
  if (first + 64 <= last) __builtin_prefetch(first + 64);
  if (first + 128 <= last) __builtin_prefetch(first + 128);
  if (first + 192 <= last) __builtin_prefetch(first + 192);
  __builtin_prefetch(last);
}

// kLq: the number of query tokens when known at compile time (0: `lq`, at run time). Known, the per-token
// arrays below live in vector registers. `table`, `slot` (KeptRows; null when nothing is pruned): the rows
// read in place of S's. The candidates' codes are a few lines each, scattered over the whole index's codes (in
// memory at scale, where the hardware prefetcher does not follow from one document to the next): each
// document's lines are requested kPrefetchDocs documents ahead.
template <typename Code, int kLq, typename T>
void ScoreDocs(const T* S, int64_t num_centroids, int64_t lq_runtime, const Code* codes, int64_t num_rows,
               const int32_t* starts, const int32_t* lens, const T* table, const int32_t* slot, float* out,
               int64_t lo, int64_t hi) {
  const int64_t lq = kLq > 0 ? kLq : lq_runtime;
  alignas(64) float acc[kLq > 0 ? kLq : kMaxQueryTokens];
  for (int64_t d = lo; d < std::min(hi, lo + kPrefetchDocs); ++d) PrefetchCodes(codes, num_rows, starts, lens, d);
  for (int64_t d = lo; d < hi; ++d) {
    if (d + kPrefetchDocs < hi) PrefetchCodes(codes, num_rows, starts, lens, d + kPrefetchDocs);
    const int64_t len = lens[d];
    const int64_t start = starts[d];
    if (len <= 0 || start < 0 || start + len > num_rows) {
      out[d] = -std::numeric_limits<float>::infinity();
      continue;
    }
    std::fill(acc, acc + lq, kMasked);
    const Code* c = codes + start;
    for (int64_t r = 0; r < len; ++r) {
      const int64_t code = static_cast<int64_t>(c[r]);
      if (code < 0 || code >= num_centroids) continue;  // padding: never part of a document
      MaxInto(acc, InteractionRow(S, table, slot, lq, code), lq);
    }
    float sum = 0.0f;
    for (int64_t q = 0; q < lq; ++q) sum += acc[q];
    out[d] = sum;
  }
}

#if !defined(__AVX512F__) && defined(__AVX2__)
#define COLBERT_JAX_INTERACTION_AVX2 1
constexpr int64_t kPrefetchRows = 8;  // rows requested ahead of their use

// ScoreDocs for 32 query tokens in AVX2 registers: a document's 32 running maxima are 4 vectors (GCC's 64-byte
// vectors of ScoreDocs split into register pairs here went through the stack). The rows each embedding reads
// are random (S's, in L3 or memory, where nothing is pruned; else the kept rows' table, in L2), so they are
// prefetched kPrefetchRows rows ahead, into the next document, as are the codes kPrefetchDocs documents ahead.
// The same maxima and the same sum, in the same order, as ScoreDocs.
template <typename Code>
void ScoreDocs32Avx2(const float* S, int64_t num_centroids, const Code* codes, int64_t num_rows,
                     const int32_t* starts, const int32_t* lens, const float* table, const int32_t* slot, float* out,
                     int64_t lo, int64_t hi) {
  const __m256 masked = _mm256_set1_ps(kMasked);
  auto valid = [&](int64_t d) { return lens[d] > 0 && starts[d] >= 0 && int64_t{starts[d]} + lens[d] <= num_rows; };
  // The prefetch cursor: document pd, row pr of it, kept kPrefetchRows rows ahead of the rows being scored.
  int64_t pd = lo, pr = 0;
  auto prefetch_next = [&]() {
    while (pd < hi && (!valid(pd) || pr >= lens[pd])) ++pd, pr = 0;
    if (pd >= hi) return;
    const int64_t code = static_cast<int64_t>(codes[starts[pd] + pr++]);
    if (code < 0 || code >= num_centroids || (slot != nullptr && slot[code] == 0)) return;  // the masked row: in L1
    const float* row = InteractionRow(S, table, slot, 32, code);
    __builtin_prefetch(row);
    __builtin_prefetch(row + 16);
  };
  for (int64_t d = lo; d < std::min(hi, lo + kPrefetchDocs); ++d) PrefetchCodes(codes, num_rows, starts, lens, d);
  for (int64_t i = 0; i < kPrefetchRows; ++i) prefetch_next();
  alignas(32) float acc[32];
  for (int64_t d = lo; d < hi; ++d) {
    if (d + kPrefetchDocs < hi) PrefetchCodes(codes, num_rows, starts, lens, d + kPrefetchDocs);
    if (!valid(d)) {
      out[d] = -std::numeric_limits<float>::infinity();
      continue;
    }
    __m256 a0 = masked, a1 = masked, a2 = masked, a3 = masked;
    const Code* c = codes + starts[d];
    const int64_t len = lens[d];
    for (int64_t r = 0; r < len; ++r) {
      prefetch_next();
      const int64_t code = static_cast<int64_t>(c[r]);
      if (code < 0 || code >= num_centroids) continue;  // padding: never part of a document
      const float* row = InteractionRow(S, table, slot, 32, code);
      const __m256 r0 = _mm256_loadu_ps(row), r1 = _mm256_loadu_ps(row + 8);
      const __m256 r2 = _mm256_loadu_ps(row + 16), r3 = _mm256_loadu_ps(row + 24);
      a0 = _mm256_max_ps(a0, r0);  // acc > row ? acc : row, as Max
      a1 = _mm256_max_ps(a1, r1);
      a2 = _mm256_max_ps(a2, r2);
      a3 = _mm256_max_ps(a3, r3);
    }
    _mm256_store_ps(acc, a0);
    _mm256_store_ps(acc + 8, a1);
    _mm256_store_ps(acc + 16, a2);
    _mm256_store_ps(acc + 24, a3);
    float sum = 0.0f;
    for (int q = 0; q < 32; ++q) sum += acc[q];
    out[d] = sum;
  }
}
#endif

template <ffi::DataType CodeType>
ffi::Error CentroidInteraction(ffi::ThreadPool pool, ffi::AnyBuffer S, ffi::Buffer<CodeType> codes,
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
  if (S.element_type() != ffi::DataType::F32 && S.element_type() != ffi::DataType::F16) {
    return ffi::Error::InvalidArgument("centroid_interaction: S needs float32 or float16 scores");
  }
  const bool half = S.element_type() == ffi::DataType::F16;
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

  // Each query's kept rows (KeptRows), once per (S, threshold) pair, before its documents' tasks read them.
  const int64_t flag_sets = s_batch == 1 && t_batch == 1 ? 1 : batch;
  std::vector<int32_t> slots;
  std::vector<std::vector<uint16_t>> half_tables(half ? flag_sets : 0);
  std::vector<std::vector<float>> float_tables(half ? 0 : flag_sets);
  std::vector<uint8_t> prune(flag_sets);
  if (n > 0 && batch > 0) {
    slots.resize(flag_sets * num_centroids);
    for (int64_t f = 0; f < flag_sets; ++f) {
      prune[f] = t_data[t_batch == 1 ? 0 : f] > -std::numeric_limits<float>::infinity();
    }
    RunTasks(pool, flag_sets, flag_sets * num_centroids, kRowsPerThread, [&](int64_t f) {
      if (!prune[f]) return;
      const int64_t at = (s_batch == 1 ? 0 : f) * num_centroids * lq;
      const float t = t_data[t_batch == 1 ? 0 : f];
      int32_t* slot = slots.data() + f * num_centroids;
      if (half) {
        KeptRows(static_cast<const uint16_t*>(S.untyped_data()) + at, num_centroids, lq, t, slot, half_tables[f]);
      } else {
        KeptRows(static_cast<const float*>(S.untyped_data()) + at, num_centroids, lq, t, slot, float_tables[f]);
      }
    });
  }

  auto task = [&](int64_t t) {
    const int64_t b = t / per_query_tasks;
    const int64_t lo = (t % per_query_tasks) * kDocsPerTask;
    const int64_t hi = std::min<int64_t>(lo + kDocsPerTask, n);
    const int64_t f = flag_sets == 1 ? 0 : b;
    const int32_t* slot = prune[f] ? slots.data() + f * num_centroids : nullptr;
    const int64_t at = (s_batch == 1 ? 0 : b) * num_centroids * lq;
    const Code* cb = c_data + (c_batch == 1 ? 0 : b) * num_rows;
    const int32_t* sb = st + (st_batch == 1 ? 0 : b) * n;
    const int32_t* lb = ln + (ln_batch == 1 ? 0 : b) * n;
    if (half) {
      const uint16_t* sd = static_cast<const uint16_t*>(S.untyped_data()) + at;
      const uint16_t* table = slot != nullptr ? half_tables[f].data() : nullptr;
      auto run = lq == 32 ? ScoreDocs<Code, 32, uint16_t> : ScoreDocs<Code, 0, uint16_t>;
      run(sd, num_centroids, lq, cb, num_rows, sb, lb, table, slot, o + b * n, lo, hi);
      return;
    }
    const float* sd = static_cast<const float*>(S.untyped_data()) + at;
    const float* table = slot != nullptr ? float_tables[f].data() : nullptr;
#if defined(COLBERT_JAX_INTERACTION_AVX2)
    if (lq == 32) {
      ScoreDocs32Avx2(sd, num_centroids, cb, num_rows, sb, lb, table, slot, o + b * n, lo, hi);
      return;
    }
#endif
    auto run = lq == 32 ? ScoreDocs<Code, 32, float> : ScoreDocs<Code, 0, float>;
    run(sd, num_centroids, lq, cb, num_rows, sb, lb, table, slot, o + b * n, lo, hi);
  };
  RunTasks(pool, tasks, rows, kRowsPerThread, task);
  return ffi::Error::Success();
}


// The row of S holding centroid `code`'s scores: S's own row, or where stage 6 recomputed q . c for the
// survivors' centroids (`CentroidRows`), the slot it gave `code`.
inline int64_t SlotOf(const int32_t* slot, int64_t code) { return slot == nullptr ? code : slot[code]; }

// q . c in float32 [hi - lo, lq] for the centroids `which[lo..hi)` of centroids [P, dim], against Q transposed
// (qt [dim, lq]): each score one FMA chain over the dimensions. Stage 6 takes these in place of stage 1's S
// where S came from bfloat16 operands, so that final scores keep float32's q . c.
void CentroidRows(const float* qt, int64_t lq, int64_t dim, const float* centroids, const int32_t* which,
                  int64_t lo, int64_t hi, float* out) {
  if (lq == 32) {
#if defined(__AVX512F__)
    // 8 centroids a block: per dimension 2 loads of Q^T, 8 broadcasts and 16 FMAs (with 4, the compiler folded
    // Q^T's loads into the FMAs, 12 loads per 8 FMAs), and the next block's centroids prefetched meanwhile
    // (gathered rows of a table in L3 or memory: the first load of each block waited on them).
    constexpr int kRows = 8;
#else
    constexpr int kRows = 2;
#endif
    for (int64_t u = lo; u < hi; u += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, hi - u));
      const float* c[kRows];
      for (int i = 0; i < kRows; ++i) c[i] = centroids + static_cast<int64_t>(which[u + std::min(i, rows - 1)]) * dim;
      const int next_rows = static_cast<int>(std::clamp<int64_t>(hi - u - kRows, 0, kRows));
      const float* next[kRows];
      for (int i = 0; i < kRows; ++i) {
        next[i] = i < next_rows ? centroids + static_cast<int64_t>(which[u + kRows + i]) * dim : nullptr;
      }
      Vec16 lo_acc[kRows], hi_acc[kRows];
      for (int i = 0; i < kRows; ++i) lo_acc[i] = hi_acc[i] = Vec16{};
      for (int64_t j = 0; j < dim; ++j) {
        if ((j & 15) == 0) {
          for (int i = 0; i < next_rows; ++i) __builtin_prefetch(next[i] + j, 0, 3);
        }
        const Vec16 q_lo = Load(qt + j * 32), q_hi = Load(qt + j * 32 + 16);
        for (int i = 0; i < kRows; ++i) {
          const Vec16 x = Splat(c[i] + j);
          lo_acc[i] += x * q_lo;
          hi_acc[i] += x * q_hi;
        }
      }
      for (int i = 0; i < kRows; ++i) {
        if (i >= rows) break;
        Store(out + (u + i) * 32, lo_acc[i]);
        Store(out + (u + i) * 32 + 16, hi_acc[i]);
      }
    }
    return;
  }
  for (int64_t u = lo; u < hi; ++u) {
    const float* c = centroids + static_cast<int64_t>(which[u]) * dim;
    float* dot = out + u * lq;
    std::fill(dot, dot + lq, 0.0f);
    for (int64_t j = 0; j < dim; ++j)
      for (int64_t q = 0; q < lq; ++q) dot[q] += c[j] * qt[j * lq + q];
  }
}

// Exact MaxSim (stage 6): for each document d, per query token q, the best over its rows r of
//   (S[codes[r], q] + residual(r) . Q[q]) * inv_norms[r],
// residual(r) unpacked from its bytes through `table` [256, 8 / nbits] (the values one byte holds, first
// dimension first): the same terms, in the same order, as `exact_scoring.similarities`. -inf for a token of an
// empty document. The products run over the dimensions in the outer loop and the query tokens in the inner
// one, against Q transposed: the inner loop is elementwise and vectorises.
template <typename Code, int kLq>
void MaxSimDocs(const float* qt, int64_t lq_runtime, int64_t dim, const float* S, const int32_t* slot,
                int64_t num_centroids, const Code* codes, const uint8_t* residuals, int64_t bytes_per_row,
                const float* inv_norms,
                int64_t num_rows, const float* table, int64_t per_byte, const int32_t* starts, const int32_t* lens,
                float* out, int64_t lo, int64_t hi) {
  const int64_t lq = kLq > 0 ? kLq : lq_runtime;
  alignas(64) float acc[kLq > 0 ? kLq : kMaxQueryTokens];
  alignas(64) float dot[kLq > 0 ? kLq : kMaxQueryTokens];
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t d = lo; d < hi; ++d) {
    std::fill(acc, acc + lq, neg_inf);
    const int64_t len = lens[d];
    const int64_t start = starts[d];
    if (len > 0 && start >= 0 && start + len <= num_rows) {
      for (int64_t row = start; row < start + len; ++row) {
        const int64_t code = static_cast<int64_t>(codes[row]);
        if (code < 0 || code >= num_centroids) continue;
        const uint8_t* packed = residuals + row * bytes_per_row;
        std::fill(dot, dot + lq, 0.0f);
        const float* col = qt;
        for (int64_t b = 0; b < bytes_per_row; ++b) {  // each byte: per_byte dimensions, first one first
          const float* values = table + static_cast<int64_t>(packed[b]) * per_byte;
          for (int64_t k = 0; k < per_byte; ++k, col += lq) {
            const float rj = values[k];
            for (int64_t q = 0; q < lq; ++q) dot[q] += rj * col[q];
          }
        }
        const float* base = S + SlotOf(slot, code) * lq;
        const float inv = inv_norms[row];
        for (int64_t q = 0; q < lq; ++q) dot[q] = (base[q] + dot[q]) * inv;
        MaxInto(acc, dot, lq);
      }
    }
    std::copy(acc, acc + lq, out + d * lq);
  }
}

// MaxSimDocs for 32 query tokens, kRows rows of a document at a time: the same terms in the same order per row
// (each row's dot product accumulates dimension after dimension), but the rows' products are independent
// chains, so the vector unit is not waiting on one accumulator's latency; each column of Q is loaded once for
// them all. On AVX-512 twelve rows, 24 sums: a core with two full-width FMA units keeps about 8 FMAs in flight
// (four rows, 8 sums, ran it at half its rate); two rows without AVX-512.
// PerByte: the values a byte holds (8 / nbits) as a constant, so that the loop over them unrolls (0: `per_byte`).
template <typename Code, int PerByte>
void MaxSimDocs32(const float* qt, const float* S, const int32_t* slot, int64_t num_centroids, const Code* codes,
                  const uint8_t* residuals, int64_t bytes_per_row, const float* inv_norms, int64_t num_rows,
                  const float* table, int64_t per_byte, const int32_t* starts, const int32_t* lens, float* out,
                  int64_t lo, int64_t hi) {
  if (PerByte != 0) per_byte = PerByte;
#if defined(__AVX512F__)
  constexpr int kRows = 12;
#else
  // a Vec16 is two 256-bit registers here: four rows' sums (16 registers) would not fit in AVX2's 16 with the
  // column and the broadcast, and spilled, ran at half the jnp path's speed (measured on an AMD EPYC)
  constexpr int kRows = 2;
#endif
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t d = lo; d < hi; ++d) {
    Vec16 best_lo = Vec16{} + neg_inf, best_hi = Vec16{} + neg_inf;
    const int64_t len = lens[d];
    const int64_t start = starts[d];
    if (len > 0 && start >= 0 && start + len <= num_rows) {
      for (int64_t row = start; row < start + len; row += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, start + len - row));
        const uint8_t* packed[kRows];
        for (int i = 0; i < kRows; ++i) packed[i] = residuals + (row + std::min(i, rows - 1)) * bytes_per_row;
        Vec16 lo_acc[kRows], hi_acc[kRows];
        for (int i = 0; i < kRows; ++i) lo_acc[i] = hi_acc[i] = Vec16{};
        const float* col = qt;
        for (int64_t b = 0; b < bytes_per_row; ++b) {
          const float* values[kRows];
          for (int i = 0; i < kRows; ++i) values[i] = table + static_cast<int64_t>(packed[i][b]) * per_byte;
#pragma GCC unroll 8
          for (int64_t k = 0; k < (PerByte != 0 ? PerByte : per_byte); ++k, col += 32) {
            const Vec16 c_lo = Load(col), c_hi = Load(col + 16);
            for (int i = 0; i < kRows; ++i) {
              const Vec16 r = Splat(values[i] + k);
              lo_acc[i] += r * c_lo;
              hi_acc[i] += r * c_hi;
            }
          }
        }
#pragma GCC unroll 16
        for (int i = 0; i < kRows; ++i) {  // a constant bound, so that the sums stay in registers
          if (i >= rows) break;
          const int64_t code = static_cast<int64_t>(codes[row + i]);
          if (code < 0 || code >= num_centroids) continue;
          const float* base = S + SlotOf(slot, code) * 32;
          const float inv = inv_norms[row + i];
          best_lo = Max(best_lo, (Load(base) + lo_acc[i]) * inv);
          best_hi = Max(best_hi, (Load(base + 16) + hi_acc[i]) * inv);
        }
      }
    }
    Store(out + d * 32, best_lo);
    Store(out + d * 32 + 16, best_hi);
  }
}

// Whether the byte table [256, per_byte] splits into nibbles: the values of a byte's first half of dimensions
// depend on its high 4 bits alone and the second half's on its low 4 bits (an index's tables at nbits 1, 2 and
// 4, first dimension in the top bits, always do).
bool SplitsIntoNibbles(const float* table, int64_t per_byte) {
  if (per_byte < 2 || per_byte % 2 != 0) return false;
  const int64_t half = per_byte / 2;
  for (int64_t v = 0; v < 256; ++v) {
    for (int64_t k = 0; k < per_byte; ++k) {
      const int64_t same = k < half ? (v & 0xf0) : (v & 0x0f);
      if (table[v * per_byte + k] != table[same * per_byte + k]) return false;
    }
  }
  return true;
}

// The query's nibble table T [2 * bytes, 16, 32]: T[2b + h][v] = sum over the dimensions that nibble h of byte b
// holds (h = 0 the high nibble, the first half) of value(v, dim) * Q[:, dim], in dimension order: a row's
// residual . Q is then the sum of its 2 * bytes entries, one lookup a nibble instead of per_byte / 2 FMAs.
void BuildNibbleTable(const float* qt, const float* table, int64_t per_byte, int64_t bytes, float* out) {
  const int64_t half = per_byte / 2;
  for (int64_t b = 0; b < bytes; ++b) {
    for (int64_t h = 0; h < 2; ++h) {
      for (int64_t v = 0; v < 16; ++v) {
        const int64_t byte = h == 0 ? v << 4 : v;
        float* t = out + ((2 * b + h) * 16 + v) * 32;
        std::fill(t, t + 32, 0.0f);
        for (int64_t k = 0; k < half; ++k) {
          const float value = table[byte * per_byte + h * half + k];
          const float* col = qt + (b * per_byte + h * half + k) * 32;
          for (int64_t q = 0; q < 32; ++q) t[q] += value * col[q];
        }
      }
    }
  }
}

// MaxSimDocs32 from the nibble table (`BuildNibbleTable`): per row and byte, the high and low nibbles' entries
// added into separate sums (two chains a row, so the adds do not wait on each other), four rows at a time (two
// without AVX-512). The same (S + r . q) * inv_norm and maximum as MaxSimDocs32, r . q summed per nibble: not
// its bits, float32's accuracy.
//
// The table (4 KiB a byte, 128 KiB at nbits 2 and dim 128) does not fit in L1, so a document's rows go in
// blocks of kNibbleBlockRows, each block byte range by byte range (kNibbleChunkBytes: a 32 KiB slice of the
// table), its rows' partial sums kept in a small buffer between ranges. Each row still adds its bytes in order
// into the same four sums (a store and reload of a float32 is exact), so the same bits as one pass over all
// the bytes; the table's lines come from L2 once a block of rows instead of once every four rows.
constexpr int64_t kNibbleBlockRows = 32;
constexpr int64_t kNibbleChunkBytes = 8;

template <typename Code>
void MaxSimDocs32Nibbles(const float* nibbles, const float* S, const int32_t* slot, int64_t num_centroids,
                         const Code* codes, const uint8_t* residuals, int64_t bytes_per_row, const float* inv_norms,
                         int64_t num_rows, const int32_t* starts, const int32_t* lens, float* out, int64_t lo,
                         int64_t hi) {
#if defined(__AVX512F__)
  constexpr int kRows = 4;
#else
  constexpr int kRows = 2;
#endif
  static_assert(kNibbleBlockRows % kRows == 0);
  alignas(64) float part[kNibbleBlockRows][4][kLanes];  // a block's rows' four sums between byte ranges
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t d = lo; d < hi; ++d) {
    Vec16 best_lo = Vec16{} + neg_inf, best_hi = Vec16{} + neg_inf;
    const int64_t len = lens[d];
    const int64_t start = starts[d];
    if (len > 0 && start >= 0 && start + len <= num_rows) {
      for (int64_t r0 = start; r0 < start + len; r0 += kNibbleBlockRows) {
        const int64_t r1 = std::min(r0 + kNibbleBlockRows, start + len);
        for (int64_t b0 = 0; b0 < bytes_per_row; b0 += kNibbleChunkBytes) {
          const int64_t b1 = std::min(b0 + kNibbleChunkBytes, bytes_per_row);
          for (int64_t row = r0; row < r1; row += kRows) {
            const int rows = static_cast<int>(std::min<int64_t>(kRows, r1 - row));
            const uint8_t* packed[kRows];
            for (int i = 0; i < kRows; ++i) packed[i] = residuals + (row + std::min(i, rows - 1)) * bytes_per_row;
            float(*saved)[4][kLanes] = part + (row - r0);
            Vec16 h_lo[kRows], h_hi[kRows], l_lo[kRows], l_hi[kRows];
            for (int i = 0; i < kRows; ++i) {
              if (b0 == 0) {
                h_lo[i] = h_hi[i] = l_lo[i] = l_hi[i] = Vec16{};
              } else {
                h_lo[i] = Load(saved[i][0]);
                h_hi[i] = Load(saved[i][1]);
                l_lo[i] = Load(saved[i][2]);
                l_hi[i] = Load(saved[i][3]);
              }
            }
            const float* t = nibbles + b0 * 2 * 16 * 32;
            for (int64_t b = b0; b < b1; ++b, t += 2 * 16 * 32) {
#pragma GCC unroll 4
              for (int i = 0; i < kRows; ++i) {
                const unsigned byte = packed[i][b];
                const float* th = t + (byte >> 4) * 32;
                const float* tl = t + (16 + (byte & 15u)) * 32;
                h_lo[i] += Load(th);
                h_hi[i] += Load(th + 16);
                l_lo[i] += Load(tl);
                l_hi[i] += Load(tl + 16);
              }
            }
            if (b1 < bytes_per_row) {
              for (int i = 0; i < kRows; ++i) {
                Store(saved[i][0], h_lo[i]);
                Store(saved[i][1], h_hi[i]);
                Store(saved[i][2], l_lo[i]);
                Store(saved[i][3], l_hi[i]);
              }
              continue;
            }
#pragma GCC unroll 4
            for (int i = 0; i < kRows; ++i) {
              if (i >= rows) break;
              const int64_t code = static_cast<int64_t>(codes[row + i]);
              if (code < 0 || code >= num_centroids) continue;
              const float* base = S + SlotOf(slot, code) * 32;
              const float inv = inv_norms[row + i];
              best_lo = Max(best_lo, (Load(base) + (h_lo[i] + l_lo[i])) * inv);
              best_hi = Max(best_hi, (Load(base + 16) + (h_hi[i] + l_hi[i])) * inv);
            }
          }
        }
      }
    }
    Store(out + d * 32, best_lo);
    Store(out + d * 32 + 16, best_hi);
  }
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define COLBERT_JAX_MAXSIM_AVX2 1
// MaxSimDocs32 in AVX2 registers, two rows of a document at a time: 8 sums, 4 query columns and a broadcast fit
// in the 16 registers. (GCC's 64-byte vectors of MaxSimDocs32 split into register pairs here spilled to the
// stack and ran at a few GFLOP/s, measured on an AMD EPYC.) Each row's sums run dimension after dimension as
// there, one FMA each. PerByte: the values a byte holds (8 / nbits) as a constant, so that the loop over them
// unrolls and the sums stay in registers (with it a run-time count, GCC stored the 8 sums to the stack on every
// dimension: 8 stores for 8 FMAs); 0 takes `per_byte`.
template <typename Code, int PerByte>
void MaxSimDocs32Avx2(const float* qt, const float* S, const int32_t* slot, int64_t num_centroids, const Code* codes,
                      const uint8_t* residuals, int64_t bytes_per_row, const float* inv_norms, int64_t num_rows,
                      const float* table, int64_t per_byte, const int32_t* starts, const int32_t* lens, float* out,
                      int64_t lo, int64_t hi) {
  constexpr int kRows = 2, kVecs = 4;
  if (PerByte != 0) per_byte = PerByte;
  for (int64_t d = lo; d < hi; ++d) {
    __m256 best[kVecs];
    for (int j = 0; j < kVecs; ++j) best[j] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const int64_t len = lens[d];
    const int64_t start = starts[d];
    if (len > 0 && start >= 0 && start + len <= num_rows) {
      for (int64_t row = start; row < start + len; row += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, start + len - row));
        const uint8_t* packed[kRows];
        for (int i = 0; i < kRows; ++i) packed[i] = residuals + (row + std::min(i, rows - 1)) * bytes_per_row;
        __m256 acc[kRows][kVecs];
        for (int i = 0; i < kRows; ++i)
          for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm256_setzero_ps();
        const float* col = qt;
        for (int64_t b = 0; b < bytes_per_row; ++b) {
          const float* values[kRows];
          for (int i = 0; i < kRows; ++i) values[i] = table + static_cast<int64_t>(packed[i][b]) * per_byte;
#pragma GCC unroll 8
          for (int64_t k = 0; k < (PerByte != 0 ? PerByte : per_byte); ++k, col += 32) {
            __m256 c[kVecs];
            for (int j = 0; j < kVecs; ++j) c[j] = _mm256_loadu_ps(col + 8 * j);
            for (int i = 0; i < kRows; ++i) {
              const __m256 r = _mm256_broadcast_ss(values[i] + k);
              for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm256_fmadd_ps(r, c[j], acc[i][j]);
            }
          }
        }
#pragma GCC unroll 2
        for (int i = 0; i < kRows; ++i) {  // a constant bound, so that acc[i] names registers, not the stack
          if (i >= rows) break;
          const int64_t code = static_cast<int64_t>(codes[row + i]);
          if (code < 0 || code >= num_centroids) continue;
          const float* base = S + SlotOf(slot, code) * 32;
          const __m256 inv = _mm256_set1_ps(inv_norms[row + i]);
          for (int j = 0; j < kVecs; ++j) {
            best[j] = _mm256_max_ps(best[j], _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(base + 8 * j), acc[i][j]), inv));
          }
        }
      }
    }
    for (int j = 0; j < kVecs; ++j) _mm256_storeu_ps(out + d * 32 + 8 * j, best[j]);
  }
}
#endif

#if COLBERT_JAX_HAS_AMX
#define COLBERT_JAX_MAXSIM_AMX 1

// A row's residual terms from its packed bytes: per byte, the kPer values the table holds for it.
template <int kPer>
inline void UnpackRow(const uint8_t* packed, int64_t bytes, const uint16_t* table, uint16_t* out) {
  for (int64_t b = 0; b < bytes; ++b) std::memcpy(out + b * kPer, table + packed[b] * kPer, kPer * 2);
}

inline void UnpackRow(const uint8_t* packed, int64_t bytes, int64_t per_byte, const uint16_t* table, uint16_t* out) {
  switch (per_byte) {  // nbits 2, 4, 1: fixed-size copies
    case 4: return UnpackRow<4>(packed, bytes, table, out);
    case 2: return UnpackRow<2>(packed, bytes, table, out);
    case 8: return UnpackRow<8>(packed, bytes, table, out);
  }
  for (int64_t b = 0; b < bytes; ++b) std::memcpy(out + b * per_byte, table + packed[b] * per_byte, per_byte * 2);
}

// nbits 2 with AVX-512 VBMI: a row's residual terms without a table load per byte. Each 2-bit field f of a
// byte (first dimension in the top bits) indexes `fields` (the 4 terms, `FieldTerms`); per 32 dimensions, one
// byte permute puts each dimension's byte in its own 16-bit lane, a variable shift and mask leave its field, and
// a word permute looks up the hi and lo terms. Bytes past the row read as zero (terms of field 0 land in the
// padding of kp, where Q's terms are zero).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))) inline void UnpackRowFields(
    const uint8_t* packed, int64_t bytes, __m512i fields_hi, __m512i fields_lo, uint16_t* hi, uint16_t* lo) {
  alignas(64) static const uint8_t kBytes[64] = {
      0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 2, 0, 2, 0, 2, 0, 2, 0, 3, 0, 3, 0, 3, 0, 3, 0,
      4, 0, 4, 0, 4, 0, 4, 0, 5, 0, 5, 0, 5, 0, 5, 0, 6, 0, 6, 0, 6, 0, 6, 0, 7, 0, 7, 0, 7, 0, 7, 0};
  const __m512i shifts = _mm512_set_epi16(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6,
                                          0, 2, 4, 6, 0, 2, 4, 6);
  const __m512i three = _mm512_set1_epi16(3);
  const __m512i base = _mm512_load_si512(kBytes);
  for (int64_t g = 0; g < bytes; g += 32) {  // 32 bytes: 128 dimensions
    const int64_t n = std::min<int64_t>(32, bytes - g);
    const __mmask32 present = n == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1);
    const __m512i row = _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(present, packed + g));
    for (int64_t c = 0; c < 4 && g + 8 * c < bytes; ++c) {  // 8 bytes: 32 dimensions
      const __m512i idx = _mm512_add_epi8(base, _mm512_set1_epi16(static_cast<int16_t>(8 * c)));
      const __m512i lane = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, idx, row);
      const __m512i f = _mm512_and_si512(_mm512_srlv_epi16(lane, shifts), three);
      _mm512_store_si512(hi + 4 * (g + 8 * c), _mm512_permutexvar_epi16(f, fields_hi));
      _mm512_store_si512(lo + 4 * (g + 8 * c), _mm512_permutexvar_epi16(f, fields_lo));
    }
  }
}

// Whether the byte table [256, 4] holds 2-bit fields, first dimension in the top bits (table[v][i] depends on
// (v >> (6 - 2i)) & 3 alone), and if so their 4 terms: hi then lo, bfloat16.
bool FieldTerms(const float* table, uint16_t* terms) {
  float values[4];
  for (int f = 0; f < 4; ++f) values[f] = table[(f << 6) * 4];
  for (int v = 0; v < 256; ++v) {
    for (int i = 0; i < 4; ++i) {
      if (table[v * 4 + i] != values[(v >> (6 - 2 * i)) & 3]) return false;
    }
  }
  for (int f = 0; f < 4; ++f) {
    terms[f] = colbert_jax_native::ToBf16(values[f]);
    terms[4 + f] = colbert_jax_native::ToBf16(values[f] - colbert_jax_native::FromBf16(terms[f]));
  }
  return true;
}

bool MaxSimAmxReady() {
  static const bool ready = colbert_jax_native::AmxReady(colbert_jax_native::AmxProducts::kBf16);
  return ready;
}

// MaxSimDocs32 on the tile unit (CPUs with AMX-BF16): a document's rows 16 at a time, their residuals r
// unpacked through the byte table's bfloat16 terms (r_hi = bf16(r), r_lo = bf16(r - r_hi)) into two A tiles per
// 32 k, and r . Q as r_hi . Q_lo + r_lo . Q_hi + r_hi . Q_hi accumulated in float32 (Q split the same way, as
// stage 1 does with the centroids): float32-class dot products, not float32's bits, at a fraction of the vector
// unit's time (256 FMAs a row there). Tiles: 0-1 the two token blocks' sums, 4-5 the rows' r_hi and r_lo, 6-7 a
// token block's Q_hi and Q_lo. The rows past a document's end in its last block are computed and dropped.
template <typename Code>
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void MaxSimDocs32Amx(
    const uint16_t* q_hi, const uint16_t* q_lo, int64_t kp, const float* S, const int32_t* slot, int64_t num_centroids,
    const Code* codes, const uint8_t* residuals, int64_t bytes_per_row, const float* inv_norms, int64_t num_rows,
    const uint16_t* t_hi, const uint16_t* t_lo, int64_t per_byte, const uint16_t* fields, const int32_t* starts,
    const int32_t* lens, float* out, int64_t lo, int64_t hi) {
  colbert_jax_native::ConfigureTiles();
  alignas(64) uint16_t field_words[2][32] = {};  // the 4 terms in the low words of a vector, hi then lo
  if (fields != nullptr) {
    std::copy(fields, fields + 4, field_words[0]);
    std::copy(fields + 4, fields + 8, field_words[1]);
  }
  const __m512i fields_hi = _mm512_load_si512(field_words[0]), fields_lo = _mm512_load_si512(field_words[1]);
  colbert_jax_native::TileBuffer<uint16_t> a_hi(16 * kp, 0), a_lo(16 * kp, 0);  // zeros past dim stay zeros
  alignas(64) float sums[2][16 * 16];
  const int64_t stride = kp * 2;  // bytes per A row
  const int64_t q_tile = 16 * 32;  // bfloat16 per B tile
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t d = lo; d < hi; ++d) {
    Vec16 best_lo = Vec16{} + neg_inf, best_hi = Vec16{} + neg_inf;
    const int64_t len = lens[d];
    const int64_t start = starts[d];
    if (len > 0 && start >= 0 && start + len <= num_rows) {
      for (int64_t row = start; row < start + len; row += 16) {
        const int64_t rows = std::min<int64_t>(16, start + len - row);
        for (int64_t i = 0; i < rows; ++i) {
          const uint8_t* packed = residuals + (row + i) * bytes_per_row;
          if (fields != nullptr) {
            UnpackRowFields(packed, bytes_per_row, fields_hi, fields_lo, a_hi.data() + i * kp, a_lo.data() + i * kp);
            continue;
          }
          UnpackRow(packed, bytes_per_row, per_byte, t_hi, a_hi.data() + i * kp);
          UnpackRow(packed, bytes_per_row, per_byte, t_lo, a_lo.data() + i * kp);
        }
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t k = 0; k < kp; k += 32) {
          const int64_t at = (k / 32) * 2 * q_tile;
          _tile_loadd(4, a_hi.data() + k, stride);
          _tile_loadd(5, a_lo.data() + k, stride);
          _tile_loadd(6, q_hi + at, 64);
          _tile_loadd(7, q_lo + at, 64);
          _tile_dpbf16ps(0, 4, 7);
          _tile_dpbf16ps(0, 5, 6);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(6, q_hi + at + q_tile, 64);
          _tile_loadd(7, q_lo + at + q_tile, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(1, 5, 6);
          _tile_dpbf16ps(1, 4, 6);
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t code = static_cast<int64_t>(codes[row + i]);
          if (code < 0 || code >= num_centroids) continue;
          const float* base = S + SlotOf(slot, code) * 32;
          const float inv = inv_norms[row + i];
          best_lo = Max(best_lo, (Load(base) + Load(sums[0] + i * 16)) * inv);
          best_hi = Max(best_hi, (Load(base + 16) + Load(sums[1] + i * 16)) * inv);
        }
      }
    }
    Store(out + d * 32, best_lo);
    Store(out + d * 32 + 16, best_hi);
  }
  _tile_release();
}
#endif

template <ffi::DataType CodeType>
ffi::Error ExactMaxSim(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> Q, ffi::AnyBuffer S,
                       ffi::Buffer<ffi::F32> centroids, ffi::Buffer<CodeType> codes, ffi::Buffer<ffi::U8> residuals,
                       ffi::Buffer<ffi::F32> inv_norms,
                       ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::S32> lens,
                       ffi::ResultBuffer<ffi::F32> out, int32_t implementation) {
  using Code = ffi::NativeType<CodeType>;
  auto q_dims = Q.dimensions();
  auto s_dims = S.dimensions();
  auto r_dims = residuals.dimensions();
  auto t_dims = table.dimensions();
  auto c_dims = centroids.dimensions();
  if (q_dims.size() != 2 || s_dims.size() != 2 || r_dims.size() != 2 || t_dims.size() != 2 || c_dims.size() != 2 ||
      codes.dimensions().size() != 1 || inv_norms.dimensions().size() != 1 || starts.dimensions().size() != 1 ||
      lens.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument(
        "exact_maxsim: needs Q [Lq, dim], S [P, Lq], centroids [P or 0, dim], codes [R], residuals [R, B], "
        "inv_norms [R], table [256, k], starts and lens [n] (no batch axis)");
  }
  const int64_t lq = q_dims[0], dim = q_dims[1];
  const int64_t num_centroids = s_dims[0];
  const int64_t num_rows = codes.element_count();
  const int64_t bytes_per_row = r_dims[1];
  const int64_t per_byte = t_dims[1];
  const int64_t n = starts.element_count();
  if (lq > kMaxQueryTokens || dim > kMaxDim || s_dims[1] != lq || r_dims[0] != num_rows ||
      inv_norms.element_count() != num_rows || t_dims[0] != 256 || bytes_per_row * per_byte != dim ||
      lens.element_count() != n || out->element_count() != n * lq ||
      (c_dims[0] != 0 && (c_dims[0] != num_centroids || c_dims[1] != dim))) {
    return ffi::Error::InvalidArgument("exact_maxsim: operand shapes do not fit together");
  }
  // S's own rows are read only without the centroids (with them, only its shape): float32 then
  if (c_dims[0] == 0 && S.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("exact_maxsim: S needs float32 scores (float16 ones only with the centroids)");
  }
  // implementation: 0 the vector unit's products, 1 AMX tiles, 2 the nibble table (`MaxSimDocs32Nibbles`)
  const bool amx = implementation == 1;
  if (implementation < 0 || implementation > 2) return ffi::Error::InvalidArgument("exact_maxsim: no such implementation");
  if (implementation != 0 && lq != 32) {
    return ffi::Error::InvalidArgument("exact_maxsim: the AMX and table paths take 32 query tokens");
  }
#if COLBERT_JAX_MAXSIM_AMX
  const bool use_amx = amx && MaxSimAmxReady();
#else
  const bool use_amx = false;
#endif
  if (amx && !use_amx) return ffi::Error::InvalidArgument("exact_maxsim: this CPU or OS has no AMX-BF16");
  AlignedFloats qt = NewAlignedFloats(dim * lq);
  const float* qd = Q.typed_data();
  for (int64_t q = 0; q < lq; ++q)
    for (int64_t j = 0; j < dim; ++j) qt[j * lq + q] = qd[q * dim + j];
  const int32_t* st = starts.typed_data();
  const int32_t* ln = lens.typed_data();
  int64_t rows = 0;
  for (int64_t i = 0; i < n; ++i) rows += std::max<int32_t>(ln[i], 0);
  const float* qtp = qt.get();
  const float* s_data = c_dims[0] == 0 ? static_cast<const float*>(S.untyped_data()) : nullptr;
  const Code* c_data = codes.typed_data();
  // With the centroids: q . c in float32 for the distinct centroids of the documents' rows, each given a slot
  // (its row in `refined`), in place of S's rows (stage 1 on bfloat16 operands).
  AlignedFloats refined;
  std::vector<int32_t> which;
  thread_local std::vector<int32_t> slots;  // -1 between calls; one per calling thread (searches in flight)
  const int32_t* slot = nullptr;
  if (c_dims[0] != 0) {
    if (static_cast<int64_t>(slots.size()) < num_centroids) slots.assign(num_centroids, -1);
    for (int64_t i = 0; i < n; ++i) {
      if (ln[i] <= 0 || st[i] < 0 || st[i] + static_cast<int64_t>(ln[i]) > num_rows) continue;  // as the kernels
      for (int64_t row = st[i]; row < st[i] + static_cast<int64_t>(ln[i]); ++row) {
        const int64_t code = static_cast<int64_t>(c_data[row]);
        if (code < 0 || code >= num_centroids || slots[code] >= 0) continue;
        slots[code] = static_cast<int32_t>(which.size());
        which.push_back(static_cast<int32_t>(code));
      }
    }
    const int64_t distinct = static_cast<int64_t>(which.size());
    refined = NewAlignedFloats(std::max<int64_t>(distinct, 1) * lq);
    const float* cents = centroids.typed_data();
    const int32_t* wp = which.data();
    float* rp = refined.get();
    constexpr int64_t kCentroidsPerTask = 256;
    RunTasks(pool, (distinct + kCentroidsPerTask - 1) / kCentroidsPerTask, distinct, kMaxSimRowsPerThread,
             [=](int64_t t) {
               CentroidRows(qtp, lq, dim, cents, wp, t * kCentroidsPerTask,
                            std::min<int64_t>((t + 1) * kCentroidsPerTask, distinct), rp);
             });
    s_data = rp;
    slot = slots.data();
  }
  const uint8_t* r_data = residuals.typed_data();
  const float* inv = inv_norms.typed_data();
  const float* tab = table.typed_data();
  float* o = out->typed_data();
  // Documents per task: the AMX path configures the tiles and its buffers once per task.
  const int64_t kDocs = use_amx ? 16 : 4;
  const int64_t tasks = (n + kDocs - 1) / kDocs;
  // The AMX path's operands: Q's bfloat16 terms in B tiles, the byte table's in [256, per_byte].
  const int64_t kp = (dim + 31) / 32 * 32;
  colbert_jax_native::TileBuffer<uint16_t> q_hi, q_lo, t_hi, t_lo;
  if (use_amx) {
    q_hi.resize(kp * 32);
    q_lo.resize(kp * 32);
    colbert_jax_native::SplitForTiles(qd, lq, dim, kp, 2, q_hi.data(), q_lo.data());
    t_hi.resize(256 * per_byte);
    t_lo.resize(256 * per_byte);
    for (int64_t i = 0; i < 256 * per_byte; ++i) {
      t_hi[i] = colbert_jax_native::ToBf16(tab[i]);
      t_lo[i] = colbert_jax_native::ToBf16(tab[i] - colbert_jax_native::FromBf16(t_hi[i]));
    }
  }
  const uint16_t *qh = q_hi.data(), *ql = q_lo.data(), *th = t_hi.data(), *tl = t_lo.data();
  // The table path's per-query nibble table; a byte table that does not split into nibbles takes the vector path.
  AlignedFloats nibbles;
  if (implementation == 2 && SplitsIntoNibbles(tab, per_byte)) {
    nibbles = NewAlignedFloats(2 * bytes_per_row * 16 * 32);
    BuildNibbleTable(qtp, tab, per_byte, bytes_per_row, nibbles.get());
  }
  const float* nib = nibbles.get();
#if COLBERT_JAX_MAXSIM_AMX
  // nbits 2: the residual terms by permutes where the CPU has VBMI (every CPU with AMX so far) and the table is
  // made of 2-bit fields (an index's always is).
  uint16_t field_terms[8];
  const bool by_fields = use_amx && per_byte == 4 && __builtin_cpu_supports("avx512vbmi") && FieldTerms(tab, field_terms);
  const uint16_t* fields = by_fields ? field_terms : nullptr;
#endif
  auto task = [=](int64_t t) {
    const int64_t lo = t * kDocs;
#if COLBERT_JAX_MAXSIM_AMX
    if (use_amx) {
      MaxSimDocs32Amx<Code>(qh, ql, kp, s_data, slot, num_centroids, c_data, r_data, bytes_per_row, inv, num_rows, th,
                            tl, per_byte, fields, st, ln, o, lo, std::min<int64_t>(lo + kDocs, n));
      return;
    }
#endif
    if (nib != nullptr) {
      return MaxSimDocs32Nibbles<Code>(nib, s_data, slot, num_centroids, c_data, r_data, bytes_per_row, inv, num_rows,
                                       st, ln, o, lo, std::min<int64_t>(lo + kDocs, n));
    }
    if (lq == 32) {
      const int64_t hi = std::min<int64_t>(lo + kDocs, n);
#if defined(COLBERT_JAX_MAXSIM_AVX2)
#define COLBERT_JAX_MAXSIM32 MaxSimDocs32Avx2
#else
#define COLBERT_JAX_MAXSIM32 MaxSimDocs32
#endif
      switch (per_byte) {  // nbits 2, 4 and 1: the values per byte as a constant
        case 4: return COLBERT_JAX_MAXSIM32<Code, 4>(qtp, s_data, slot, num_centroids, c_data, r_data,
                                                     bytes_per_row, inv, num_rows, tab, per_byte, st, ln, o, lo, hi);
        case 2: return COLBERT_JAX_MAXSIM32<Code, 2>(qtp, s_data, slot, num_centroids, c_data, r_data,
                                                     bytes_per_row, inv, num_rows, tab, per_byte, st, ln, o, lo, hi);
        case 8: return COLBERT_JAX_MAXSIM32<Code, 8>(qtp, s_data, slot, num_centroids, c_data, r_data,
                                                     bytes_per_row, inv, num_rows, tab, per_byte, st, ln, o, lo, hi);
        default: return COLBERT_JAX_MAXSIM32<Code, 0>(qtp, s_data, slot, num_centroids, c_data, r_data,
                                                      bytes_per_row, inv, num_rows, tab, per_byte, st, ln, o, lo, hi);
      }
#undef COLBERT_JAX_MAXSIM32
    }
    MaxSimDocs<Code, 0>(qtp, lq, dim, s_data, slot, num_centroids, c_data, r_data, bytes_per_row, inv, num_rows, tab,
                        per_byte, st, ln, o, lo, std::min<int64_t>(lo + kDocs, n));
  };

  RunTasks(pool, tasks, rows, kMaxSimRowsPerThread, task);
  for (const int32_t code : which) slots[code] = -1;
  return ffi::Error::Success();
}

}  // namespace

#define COLBERT_JAX_BIND(CODE)                  \
  ffi::Ffi::Bind()                              \
      .Ctx<ffi::ThreadPool>()                   \
      .Arg<ffi::AnyBuffer>()                    \
      .Arg<ffi::Buffer<CODE>>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<ffi::S32>>()             \
      .Arg<ffi::Buffer<ffi::S32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxCentroidInteractionS32, CentroidInteraction<ffi::S32>,
                              COLBERT_JAX_BIND(ffi::S32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxCentroidInteractionU16, CentroidInteraction<ffi::U16>,
                              COLBERT_JAX_BIND(ffi::U16));

#define COLBERT_JAX_BIND_MAXSIM(CODE)           \
  ffi::Ffi::Bind()                              \
      .Ctx<ffi::ThreadPool>()                   \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::AnyBuffer>()                    \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<CODE>>()                 \
      .Arg<ffi::Buffer<ffi::U8>>()              \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<ffi::S32>>()             \
      .Arg<ffi::Buffer<ffi::S32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>()             \
      .Attr<int32_t>("implementation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxExactMaxSimS32, ExactMaxSim<ffi::S32>, COLBERT_JAX_BIND_MAXSIM(ffi::S32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxExactMaxSimU16, ExactMaxSim<ffi::U16>, COLBERT_JAX_BIND_MAXSIM(ffi::U16));
