// PLAID's stage 1 product, the centroid scores S = C . Q^T, on the tile unit of CPUs with AMX-BF16, called
// from XLA programs through the XLA FFI (`colbert_jax.native.centroid_scores`).
//
// A float32 product from three bfloat16 products: each float x is split into x_hi = bf16(x) and
// x_lo = bf16(x - x_hi) (round to nearest even), and
//   S[p, q] = (C_hi . Q_hi^T) + (C_hi . Q_lo^T + C_lo . Q_hi^T)
// with both sums accumulated in float32 by the tile unit. What is dropped (C_lo . Q_lo and the rounding of the
// low terms) is below 2^-16 of each product, the size of float32's own rounding over a 128-term sum, while the
// tile unit runs the three products several times faster than the vector unit runs one float32 product.
//
// The centroids arrive split and padded (`colbert_jax.native.split_centroids`): [2, Pp, Kp] bfloat16, hi then
// lo, Pp = P rounded up to 16, Kp = dim rounded up to 32 (zeros). Q [Lq, dim] float32 is split here, into the
// AMX B-tile layout (pairs of consecutive k of one token adjacent). S [P, Lq] float32. Each row of S depends on
// that centroid and the query alone (no batch or thread effects). Where the CPU has no AMX-BF16 a portable loop
// computes the same sums in the same groups (not bit for bit: the tile unit's float32 accumulation order within
// an instruction is its own).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::RunTasks;

constexpr int64_t kBlock = 16;            // rows (centroids) per tile, and columns (tokens) per tile
constexpr int64_t kPairsPerTile = 16;     // a B tile holds 16 pairs of k: 32 k per instruction
constexpr int64_t kRowsPerThread = 2048;  // below this many centroids per thread, one thread does it all
constexpr int64_t kBlocksPerTask = 16;

using colbert_jax_native::FromBf16;
using colbert_jax_native::ToBf16;

// Q [lq, dim] -> its hi and lo terms in the B-tile layout (`colbert_jax_native::SplitForTiles`).
inline void SplitQuery(const float* q, int64_t lq, int64_t dim, int64_t kp, int64_t nb, uint16_t* hi, uint16_t* lo) {
  colbert_jax_native::SplitForTiles(q, lq, dim, kp, nb, hi, lo);
}

// Row blocks [b0, b1) with plain loops: the same three products, each summed in float32 over k.
void ScoresPortable(const uint16_t* c_hi, const uint16_t* c_lo, const uint16_t* q_hi, const uint16_t* q_lo,
                    int64_t kp, int64_t nb, int64_t p, int64_t lq, int64_t b0, int64_t b1, float* s) {
  for (int64_t r = b0 * kBlock; r < std::min(b1 * kBlock, p); ++r) {
    for (int64_t t = 0; t < lq; ++t) {
      float main = 0.0f, cross = 0.0f;
      for (int64_t k = 0; k < kp; ++k) {
        const int64_t at = (((k / 32) * nb + t / kBlock) * kPairsPerTile + (k % 32) / 2) * (2 * kBlock) +
                           (t % kBlock) * 2 + k % 2;
        const float ch = FromBf16(c_hi[r * kp + k]), cl = FromBf16(c_lo[r * kp + k]);
        const float qh = FromBf16(q_hi[at]), ql = FromBf16(q_lo[at]);
        main += ch * qh;
        cross += ch * ql + cl * qh;
      }
      s[r * lq + t] = main + cross;
    }
  }
}

#if COLBERT_JAX_HAS_AMX
#define COLBERT_JAX_AMX_BF16_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f")))


// Row blocks [b0, b1), two column blocks (32 tokens) at a time. Tiles: 0-1 the main product of the two column
// blocks, 2-3 their cross terms, 4-5 the centroids' hi and lo for 32 k, 6-7 one column block's query hi and lo.
COLBERT_JAX_AMX_BF16_TARGET void ScoresAmx(const uint16_t* c_hi, const uint16_t* c_lo, const uint16_t* q_hi,
                                            const uint16_t* q_lo, int64_t kp, int64_t nb, int64_t p, int64_t lq,
                                            int64_t b0, int64_t b1, float* s) {
  colbert_jax_native::ConfigureTiles();
  alignas(64) float c[4][kBlock * kBlock];
  const int64_t stride = kp * 2;  // bytes per centroid row
  const int64_t q_tile = kPairsPerTile * 2 * kBlock;  // bfloat16 per B tile
  for (int64_t cb = 0; cb < nb; cb += 2) {
    const bool two = cb + 1 < nb;
    for (int64_t b = b0; b < b1; ++b) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* hi = c_hi + b * kBlock * kp;
      const uint16_t* lo = c_lo + b * kBlock * kp;
      for (int64_t k = 0; k < kp; k += 32) {
        _tile_loadd(4, hi + k, stride);
        _tile_loadd(5, lo + k, stride);
        const int64_t at = ((k / 32) * nb + cb) * q_tile;
        _tile_loadd(6, q_hi + at, 64);
        _tile_loadd(7, q_lo + at, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
          _tile_loadd(6, q_hi + at + q_tile, 64);
          _tile_loadd(7, q_lo + at + q_tile, 64);
          _tile_dpbf16ps(1, 4, 6);
          _tile_dpbf16ps(3, 4, 7);
          _tile_dpbf16ps(3, 5, 6);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      const int64_t rows = std::min<int64_t>(kBlock, p - b * kBlock);
      for (int64_t half = 0; half < (two ? 2 : 1); ++half) {
        const int64_t col = (cb + half) * kBlock;
        const int64_t cols = std::min<int64_t>(kBlock, lq - col);
        const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1);
        for (int64_t i = 0; i < rows; ++i) {
          const __m512 sum = _mm512_add_ps(_mm512_load_ps(c[half] + i * kBlock), _mm512_load_ps(c[2 + half] + i * kBlock));
          _mm512_mask_storeu_ps(s + (b * kBlock + i) * lq + col, keep, sum);
        }
      }
    }
  }
  _tile_release();
}
#endif

bool AmxBf16Ready() {
  static const bool ready = colbert_jax_native::AmxReady(colbert_jax_native::AmxProducts::kBf16);
  return ready;
}

ffi::Error CentroidScores(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> split, ffi::Buffer<ffi::F32> q,
                          ffi::ResultBuffer<ffi::F32> s, int32_t amx) {
  auto c_dims = split.dimensions();
  auto q_dims = q.dimensions();
  auto s_dims = s->dimensions();
  if (c_dims.size() != 3 || c_dims[0] != 2 || q_dims.size() != 2 || s_dims.size() != 2) {
    return ffi::Error::InvalidArgument("centroid_scores: split centroids [2, Pp, Kp], Q [Lq, dim], S [P, Lq]");
  }
  const int64_t pp = c_dims[1], kp = c_dims[2], lq = q_dims[0], dim = q_dims[1], p = s_dims[0];
  if (s_dims[1] != lq || pp % kBlock || pp < p || pp >= p + kBlock || kp % 32 || kp < dim || kp >= dim + 32) {
    return ffi::Error::InvalidArgument("centroid_scores: the split centroids do not fit Q [Lq, dim] and S [P, Lq]");
  }
  const bool use_amx = amx != 0;
  if (use_amx && !AmxBf16Ready()) return ffi::Error::InvalidArgument("centroid_scores: this CPU or OS has no AMX-BF16");
  if (p == 0 || lq == 0) return ffi::Error::Success();
  const int64_t nb = (lq + kBlock - 1) / kBlock;
  colbert_jax_native::TileBuffer<uint16_t> q_hi(kp * nb * kBlock, 0), q_lo(kp * nb * kBlock, 0);
  SplitQuery(q.typed_data(), lq, dim, kp, nb, q_hi.data(), q_lo.data());
  const auto* c_hi = reinterpret_cast<const uint16_t*>(split.typed_data());
  const uint16_t* c_lo = c_hi + pp * kp;
  float* out = s->typed_data();
  const int64_t blocks = pp / kBlock;
  const int64_t tasks = (blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  RunTasks(pool, tasks, p, kRowsPerThread, [&](int64_t t) {
    const int64_t b0 = t * kBlocksPerTask, b1 = std::min(b0 + kBlocksPerTask, blocks);
#if COLBERT_JAX_HAS_AMX
    if (use_amx) {
      ScoresAmx(c_hi, c_lo, q_hi.data(), q_lo.data(), kp, nb, p, lq, b0, b1, out);
      return;
    }
#endif
    ScoresPortable(c_hi, c_lo, q_hi.data(), q_lo.data(), kp, nb, p, lq, b0, b1, out);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int colbert_jax_amx_bf16_ready() { return AmxBf16Ready() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxCentroidScores, CentroidScores,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("amx"));
