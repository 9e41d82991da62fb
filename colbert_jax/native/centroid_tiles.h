// What the three stage-1 kernels (centroid_scores_f32.cc in float32, centroid_scores_bf16.cc on bfloat16 pairs,
// centroid_scores_int8.cc on int8 quads) share: the split of the packed centroids' groups into tasks, and, around
// the AVX-512 register tiles, the walk over a task's groups of 8 centroids in tiles of 32 query tokens, each tile
// prefetching its share of the next group, and a tile's end, which stores its rows of S and folds them into its
// block's maxima while they are still in registers.
//
// The tile functions carry a target attribute so that centroid_scores_bf16.cc, which compiles its vector code
// with target attributes for any -march, can use them; they are only called where AVX-512F runs.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace colbert_jax_native {

constexpr int64_t kTileGroup = 8;             // centroids per group (the packed layouts' group axis)
constexpr int64_t kTileBlock = 128;           // centroids per block maximum (`candidates.CELL_BLOCK`)
constexpr int64_t kTileTokens = 32;           // query tokens per tile (two vectors)
constexpr int64_t kTileGroupsPerTask = 32;    // groups a task (whole blocks of the maxima)
constexpr int64_t kTileRowsPerThread = 2048;  // below this many centroids per thread, one thread does it all
static_assert(kTileGroupsPerTask * kTileGroup % kTileBlock == 0, "a task's centroids are whole blocks of the maxima");

// fn(g0, g1) for the tasks' ranges of groups [g0, g1) over `groups` groups of P centroids, on the pool's threads.
template <typename Fn>
inline void ForGroupTasks(xla::ffi::ThreadPool& pool, int64_t groups, int64_t p, Fn&& fn) {
  const int64_t tasks = (groups + kTileGroupsPerTask - 1) / kTileGroupsPerTask;
  RunTasks(pool, tasks, p, kTileRowsPerThread, [&](int64_t t) {
    const int64_t g0 = t * kTileGroupsPerTask;
    fn(g0, std::min(g0 + kTileGroupsPerTask, groups));
  });
}

}  // namespace colbert_jax_native

#if defined(__x86_64__)

#include <immintrin.h>

#include "blocking.h"

namespace colbert_jax_native {

#define COLBERT_JAX_AVX512_TARGET __attribute__((target("avx512f")))

// The block maximum's step, lane by lane: the running maximum m takes the row's value where that is greater or
// NaN (NaN wins, as in XLA's max; vmaxps alone returns its second operand for either NaN), so the same bits as
// a plain pass over S, signed zeros and NaNs included.
COLBERT_JAX_AVX512_TARGET inline __m512 FoldMax(__m512 m, __m512 row) {
  const __mmask16 take = _mm512_cmp_ps_mask(row, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(row, row, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(m, take, row);
}

// A tile's end: its sums acc (a group's 8 centroids x V vectors of 16 tokens from token t0) to the group's
// `rows` rows of S (s: the group's first row, lq a row), and folded into its block's maxima bm (set, not folded,
// when the group is its block's `first`).
template <int V>
COLBERT_JAX_AVX512_TARGET inline void StoreTile(const __m512 (&acc)[kTileGroup][V], int64_t rows, int64_t lq,
                                                int64_t t0, float* s, float* bm, bool first) {
  for (int v = 0; v < V; ++v) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, lq - t0 - 16 * v));
    const __mmask16 keep = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    for (int64_t j = 0; j < rows; ++j) _mm512_mask_storeu_ps(s + j * lq + t0 + 16 * v, keep, acc[j][v]);
    __m512 m = acc[0][v];
    for (int j = 1; j < kTileGroup; ++j) {
      if (j < rows) m = FoldMax(m, acc[j][v]);
    }
    if (!first) m = FoldMax(_mm512_maskz_loadu_ps(keep, bm + t0 + 16 * v), m);
    _mm512_mask_storeu_ps(bm + t0 + 16 * v, keep, m);
  }
}

// StoreTile for S held as float16 (s16: the group's first row, lq a row): each sum rounded to nearest even
// (`vcvtps2ph`), and the block's maxima those of the rounded S. Rounding is monotonic, so the maximum of rounded
// values is the rounded maximum: the maxima fold the sums as StoreTile does and are rounded once, when stored.
template <int V>
COLBERT_JAX_AVX512_TARGET inline void StoreTile(const __m512 (&acc)[kTileGroup][V], int64_t rows, int64_t lq,
                                                int64_t t0, uint16_t* s16, float* bm, bool first) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int v = 0; v < V; ++v) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, lq - t0 - 16 * v));
    for (int64_t j = 0; j < rows; ++j) {
      const __m256i h = _mm512_cvtps_ph(acc[j][v], kRound);
      uint16_t* dst = s16 + j * lq + t0 + 16 * v;
      if (left >= 16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
      } else {
        alignas(32) uint16_t buf[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(buf), h);
        std::memcpy(dst, buf, left * sizeof(uint16_t));
      }
    }
    const __mmask16 keep = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    __m512 m = acc[0][v];
    for (int j = 1; j < kTileGroup; ++j) {
      if (j < rows) m = FoldMax(m, acc[j][v]);
    }
    if (!first) m = FoldMax(_mm512_maskz_loadu_ps(keep, bm + t0 + 16 * v), m);
    _mm512_mask_storeu_ps(bm + t0 + 16 * v, keep, _mm512_cvtph_ps(_mm512_cvtps_ph(m, kRound)));
  }
}

// Groups [g0, g1) of the packed centroids c (`group_bytes` a group), all lqp tokens (a multiple of 16) in tiles
// of 32 (the last one 16 when lqp is not a multiple of 32): tile(Const<V>{}, g, rows, t0, pf, pf_lines, s_g, bm_g,
// first), with the group's rows of S and its block's row of the maxima. The tiles split the prefetch of the
// next group (none past the last): a group is about one 4 KiB page, where the hardware prefetcher stops, so
// without it each group began with its broadcasts waiting on memory.
template <typename T, typename Tile>
inline void ForGroupTiles(const void* c, int64_t group_bytes, int64_t lqp, int64_t p, int64_t groups, int64_t lq,
                          int64_t g0, int64_t g1, T* s, float* bm, Tile&& tile) {
  constexpr int64_t kGroupsPerBlock = kTileBlock / kTileGroup;
  const char* base = static_cast<const char*>(c);
  const LineShares shares((group_bytes + 63) / 64, (lqp + kTileTokens - 1) / kTileTokens);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t rows = std::min(kTileGroup, p - g * kTileGroup);
    T* sg = s + g * kTileGroup * lq;
    float* bg = bm + (g / kGroupsPerBlock) * lq;
    const bool first = g % kGroupsPerBlock == 0;
    const char* pf = base + std::min(g + 1, groups) * group_bytes;
    int64_t tile_index = 0;
    for (int64_t t0 = 0; t0 < lqp; t0 += kTileTokens, ++tile_index) {
      const LineShare share = g + 1 < groups ? shares[tile_index] : LineShare{0, 0};
      if (t0 + kTileTokens <= lqp) {
        tile(Const<2>{}, g, rows, t0, pf + share.first * 64, share.count, sg, bg, first);
      } else {
        tile(Const<1>{}, g, rows, t0, pf + share.first * 64, share.count, sg, bg, first);
      }
    }
  }
}

}  // namespace colbert_jax_native

#endif
