// PLAID's stage 1 product in float32 on CPUs without AMX-BF16 (`colbert_jax.native.centroid_scores_f32`),
// called from XLA programs through the XLA FFI: S [P, Lq] = C [P, dim] . Q [Lq, dim]^T, and each token's maximum
// over each block of 128 centroids (what stage 2 ranks first: `candidates.top_cells`).
//
// At large P the product reads P x dim x 4 bytes of centroids per query (32 MiB at 65,536 centroids), and the
// read pattern decides its speed: a block of 8 centroid rows read as 8 strided streams ran far below the
// memory's rate. Here the centroids arrive in groups of 8 (`colbert_jax.native.block_centroids`:
// [ceil(P / 8)][dim][8], the group's 8 k-th coordinates adjacent, zeros past P), so a group is one sequential
// read. With AVX-512, per k, its 8 coordinates are broadcast against vectors of query tokens; with AVX2 they
// are one vector (two groups' two), against broadcast query coordinates. Every S[p, t] is one FMA chain
// over k ascending from 0 (the same bits from the AVX-512, AVX2 and scalar paths, and for any P or thread count:
// a row of S depends on that centroid and the query alone).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "blocking.h"
#include "centroid_tiles.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::LineShares;
using colbert_jax_native::ForGroupTasks;
using colbert_jax_native::WithConst;
#if defined(__AVX512F__)
using colbert_jax_native::ForGroupTiles;
using colbert_jax_native::StoreTile;
#endif

constexpr int64_t kGroup = colbert_jax_native::kTileGroup;
constexpr int64_t kMaxBlock = colbert_jax_native::kTileBlock;

// Each token's maximum over each block of kMaxBlock centroids in rows [c0, c1) of S (c0 a multiple of
// kMaxBlock), into bm [ceil(P / kMaxBlock), lq]: taken while a task's rows of S are still in cache, which spares
// stage 2 a pass over all of S to find the blocks it ranks.
void BlockMaxima(const float* __restrict s, int64_t c0, int64_t c1, int64_t lq, float* __restrict bm) {
  for (int64_t b0 = c0; b0 < c1; b0 += kMaxBlock) {
    float* __restrict m = bm + (b0 / kMaxBlock) * lq;
    const int64_t b1 = std::min(b0 + kMaxBlock, c1);
    for (int64_t t = 0; t < lq; ++t) m[t] = s[b0 * lq + t];
    for (int64_t c = b0 + 1; c < b1; ++c) {
      const float* __restrict row = s + c * lq;
      // NaN wins, as in XLA's max (the restrict pointers let the compiler vectorize over t)
      for (int64_t t = 0; t < lq; ++t) m[t] = (row[t] > m[t] || row[t] != row[t]) ? row[t] : m[t];
    }
  }
}

// Groups [g0, g1), plain loops. qt: Q^T [dim][lqp] (lqp >= lq, zero columns past lq).
void GroupsScalar(const float* c, const float* qt, int64_t dim, int64_t lqp, int64_t p, int64_t lq, int64_t g0,
                  int64_t g1, float* s) {
  for (int64_t g = g0; g < g1; ++g) {
    const float* cg = c + g * dim * kGroup;
    for (int64_t j = 0; j < kGroup && g * kGroup + j < p; ++j) {
      for (int64_t t = 0; t < lq; ++t) {
        float acc = 0.0f;
        for (int64_t k = 0; k < dim; ++k) acc = std::fma(cg[k * kGroup + j], qt[k * lqp + t], acc);
        s[(g * kGroup + j) * lq + t] = acc;
      }
    }
  }
}

#if defined(__AVX512F__)
// One group x V vectors of 16 tokens starting at token t0; lqp is a multiple of 16. The tile also requests
// `pf_lines` cache lines from `pf` (its share of the next group's centroids), one every 2 k, and ends by
// storing its rows of S and folding them into the block maxima (centroid_tiles.h), which spares BlockMaxima's
// pass over the task's rows of S.
template <int V>
inline void TileAvx512(const float* cg, const float* qt, int64_t dim, int64_t lqp, int64_t t0, int64_t rows,
                       int64_t lq, float* s, const char* pf, int64_t pf_lines, float* bm, bool first) {
  __m512 acc[kGroup][V];
  for (int j = 0; j < kGroup; ++j) {
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < dim; ++k) {
    if ((k & 1) == 0 && (k >> 1) < pf_lines) _mm_prefetch(pf + (k >> 1) * 64, _MM_HINT_T1);
    __m512 q[V];
    for (int v = 0; v < V; ++v) q[v] = _mm512_loadu_ps(qt + k * lqp + t0 + 16 * v);
    for (int j = 0; j < kGroup; ++j) {
      const __m512 a = _mm512_set1_ps(cg[k * kGroup + j]);
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_fmadd_ps(a, q[v], acc[j][v]);
    }
  }
  StoreTile<V>(acc, rows, lq, t0, s, bm, first);
}

void GroupsAvx512(const float* c, const float* qt, int64_t dim, int64_t lqp, int64_t p, int64_t groups, int64_t lq,
                  int64_t g0, int64_t g1, float* s, float* bm) {
  ForGroupTiles(c, dim * kGroup * sizeof(float), lqp, p, groups, lq, g0, g1, s, bm,
                [&](auto vectors, int64_t g, int64_t rows, int64_t t0, const char* pf, int64_t pf_lines, float* sg,
                    float* bg, bool first) {
                  TileAvx512<decltype(vectors)::value>(c + g * dim * kGroup, qt, dim, lqp, t0, rows, lq, sg, pf,
                                                       pf_lines, bg, first);
                });
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define COLBERT_JAX_SCORES_AVX2 1
constexpr int kTokens2 = 6;  // AVX2's 16 registers: 6 tokens x 2 groups of sums, the 2 groups' coordinates, a broadcast

// G groups (G <= 2) x T tokens (T <= 6) starting at token t0: vectors of one group's 8 centroids against a
// broadcast query coordinate, so per k 2 loads and 6 broadcasts feed 12 FMAs (8 tokens of Q^T against 8
// broadcast coordinates took 9 loads for 8 FMAs). q: Q [lq][dim], token-major. The tile also requests
// `pf_lines` cache lines from `pf` (the next groups' centroids), one every 4 k: a group pair's centroids are read
// from memory by its first tile only, and the other tiles' L1 reads leave the hardware prefetcher idle.
template <int G, int T>
inline void TileAvx2(const float* cg, const float* q, int64_t dim, int64_t t0, int64_t rows, int64_t lq,
                     float* s, const char* pf, int64_t pf_lines) {
  __m256 acc[T][G];
  for (int t = 0; t < T; ++t) {
    for (int g = 0; g < G; ++g) acc[t][g] = _mm256_setzero_ps();
  }
  const float* qt0 = q + t0 * dim;
  for (int64_t k = 0; k < dim; ++k) {
    if ((k & 3) == 0 && (k >> 2) < pf_lines) _mm_prefetch(pf + (k >> 2) * 64, _MM_HINT_T1);
    __m256 c[G];
    for (int g = 0; g < G; ++g) c[g] = _mm256_loadu_ps(cg + (g * dim + k) * kGroup);
    for (int t = 0; t < T; ++t) {
      const __m256 a = _mm256_set1_ps(qt0[t * dim + k]);
      for (int g = 0; g < G; ++g) acc[t][g] = _mm256_fmadd_ps(c[g], a, acc[t][g]);
    }
  }
  alignas(32) float buf[T][G * kGroup];
  for (int t = 0; t < T; ++t) {
    for (int g = 0; g < G; ++g) _mm256_store_ps(buf[t] + g * kGroup, acc[t][g]);
  }
  for (int64_t j = 0; j < rows; ++j) {
    for (int t = 0; t < T; ++t) s[j * lq + t0 + t] = buf[t][j];
  }
}

// All lq tokens against G groups, in ceil(lq / 6) tiles of near-equal width (32 tokens: 6, 6, 5, 5, 5, 5: a
// 2-token tile's 4 FMA chains would leave the FMA units waiting on their latency). The tiles share the
// prefetch of the next `pf_bytes`.
template <int G>
void TokensAvx2(const float* cg, const float* q, int64_t dim, int64_t rows, int64_t lq, float* s, const char* pf,
                int64_t pf_bytes) {
  const int64_t tiles = (lq + kTokens2 - 1) / kTokens2;
  const LineShares shares((pf_bytes + 63) / 64, tiles);
  int64_t t0 = 0;
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t tokens = lq / tiles + (i < lq % tiles ? 1 : 0);
    WithConst<kTokens2>(tokens, [&](auto width) {
      TileAvx2<G, decltype(width)::value>(cg, q, dim, t0, rows, lq, s, pf + shares[i].first * 64, shares[i].count);
    });
    t0 += tokens;
  }
}

void GroupsAvx2(const float* c, const float* q, int64_t dim, int64_t p, int64_t groups, int64_t lq, int64_t g0,
                int64_t g1, float* s) {
  const char* end = reinterpret_cast<const char*>(c + groups * dim * kGroup);
  auto next = [&](int64_t g) { return reinterpret_cast<const char*>(c + std::min(g, groups) * dim * kGroup); };
  int64_t g = g0;
  for (; g + 2 <= g1; g += 2) {
    const int64_t rows = std::min(2 * kGroup, p - g * kGroup);
    const char* pf = next(g + 2);
    TokensAvx2<2>(c + g * dim * kGroup, q, dim, rows, lq, s + g * kGroup * lq, pf,
                  std::min<int64_t>(end - pf, 2 * dim * kGroup * sizeof(float)));
  }
  if (g < g1) {
    TokensAvx2<1>(c + g * dim * kGroup, q, dim, std::min(kGroup, p - g * kGroup), lq, s + g * kGroup * lq,
                  next(g + 1), 0);
  }
}
#endif

ffi::Error CentroidScoresF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> blocked, ffi::Buffer<ffi::F32> q,
                             ffi::ResultBuffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> maxima, int32_t vectorized) {
  auto c_dims = blocked.dimensions();
  auto q_dims = q.dimensions();
  auto s_dims = s->dimensions();
  auto m_dims = maxima->dimensions();
  if (c_dims.size() != 3 || c_dims[2] != kGroup || q_dims.size() != 2 || s_dims.size() != 2 || m_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        "centroid_scores_f32: blocked centroids [P8 / 8, dim, 8], Q [Lq, dim], S [P, Lq], maxima [P / 128, Lq]");
  }
  const int64_t groups = c_dims[0], dim = c_dims[1], lq = q_dims[0], p = s_dims[0];
  if (q_dims[1] != dim || s_dims[1] != lq || groups != (p + kGroup - 1) / kGroup) {
    return ffi::Error::InvalidArgument("centroid_scores_f32: the blocked centroids do not fit Q [Lq, dim], S [P, Lq]");
  }
  if (m_dims[0] != (p + kMaxBlock - 1) / kMaxBlock || m_dims[1] != lq) {
    return ffi::Error::InvalidArgument("centroid_scores_f32: the block maxima are not [ceil(P / 128), Lq]");
  }
  if (p == 0 || lq == 0) return ffi::Error::Success();
  const int64_t lqp = (lq + 15) / 16 * 16;
  const float* qd = q.typed_data();
#if defined(COLBERT_JAX_SCORES_AVX2)
  const bool transposed = !vectorized;  // the AVX2 tiles read Q as it is
#else
  const bool transposed = true;
#endif
  std::vector<float> qt(transposed ? dim * lqp : 0, 0.0f);  // Q^T, zero columns past lq
  for (int64_t t = 0; transposed && t < lq; ++t) {
    for (int64_t k = 0; k < dim; ++k) qt[k * lqp + t] = qd[t * dim + k];
  }
  const float* c = blocked.typed_data();
  float* out = s->typed_data();
  float* bm = maxima->typed_data();
  ForGroupTasks(pool, groups, p, [&](int64_t g0, int64_t g1) {
#if defined(__AVX512F__)
    if (vectorized) return GroupsAvx512(c, qt.data(), dim, lqp, p, groups, lq, g0, g1, out, bm);  // maxima too
#elif defined(COLBERT_JAX_SCORES_AVX2)
    if (vectorized) {
      GroupsAvx2(c, qd, dim, p, groups, lq, g0, g1, out);
      return BlockMaxima(out, g0 * kGroup, std::min(g1 * kGroup, p), lq, bm);
    }
#endif
    GroupsScalar(c, qt.data(), dim, lqp, p, lq, g0, g1, out);
    BlockMaxima(out, g0 * kGroup, std::min(g1 * kGroup, p), lq, bm);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxCentroidScoresF32, CentroidScoresF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("vectorized"));
