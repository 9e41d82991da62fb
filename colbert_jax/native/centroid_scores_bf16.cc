// PLAID's stage 1 product on bfloat16 operands with AVX-512 BF16 (`vdpbf16ps`), for CPUs that have it but no
// AMX-BF16 (Zen 4): S [P, Lq] = bf16(C) . bf16(Q)^T accumulated in float32, and each token's maximum over each
// block of 128 centroids, as `centroid_scores_f32.cc` returns them (`colbert_jax.native.centroid_scores_bf16`).
//
// Stage 1 at large P is a read of all the centroids per query; bfloat16 halves the bytes and vdpbf16ps does two
// products per lane per instruction. The centroids arrive packed (`colbert_jax.native.block_centroids_bf16`:
// [ceil(P / 8)][ceil(dim / 2)][8][2], a group's 8 rows' coordinate pairs (2kk, 2kk + 1) adjacent, zeros past P
// and dim), so a group is one sequential read and a row's pair is one 32-bit broadcast. Q is rounded to
// bfloat16 here (round to nearest even), transposed to pairs [ceil(dim / 2)][lqp] for vectors of 16 tokens.
//
// Every S[p, t] is one vdpbf16ps chain over the pairs kk ascending: per pair, the odd coordinate's product is
// added before the even one's (each product of two bfloat16 is exact in float32; the adds round to nearest
// even, denormals flushed, as the instruction defines). A row of S depends on that centroid and the query only.
//
// The vector code is compiled with a target attribute, so the library builds for any x86-64 -march; it runs
// only where `colbert_jax_avx512_bf16_ready()` says so (Python checks it before tracing a call, and the handler
// refuses rather than executing an instruction the CPU lacks).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 10)
#define COLBERT_JAX_HAS_BF16 1
#include <immintrin.h>
#endif

#include "bf16.h"
#include "centroid_tiles.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::ForGroupTasks;
using colbert_jax_native::ToBf16;
#if COLBERT_JAX_HAS_BF16
using colbert_jax_native::ForGroupTiles;
using colbert_jax_native::StoreTile;
#endif

constexpr int64_t kGroup = colbert_jax_native::kTileGroup;
constexpr int64_t kMaxBlock = colbert_jax_native::kTileBlock;

// Whether this CPU and OS run AVX-512 BF16, and the library was built for an AVX-512 CPU type: a build for an
// older type (`COLBERT_JAX_NATIVE_ARCH`) stands for a CPU without it.
bool Bf16Ready() {
#if COLBERT_JAX_HAS_BF16 && defined(__AVX512F__)
  return colbert_jax_native::CpuRunsAvx512Bf16();
#else
  return false;
#endif
}

#if COLBERT_JAX_HAS_BF16
#define COLBERT_JAX_BF16_TARGET __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))

// One group x V vectors of 16 tokens starting at token t0 (qp: Q's pairs [dim2][lqp], lqp a multiple of 16).
// Like the float32 tiles it requests `pf_lines` lines of the next group (a group need not end on a page the
// hardware prefetcher continues into) and folds the group's maxima into `bm` from the sums in registers.
template <int V>
COLBERT_JAX_BF16_TARGET inline void TileBf16(const uint32_t* cg, const uint32_t* qp, int64_t dim2, int64_t lqp,
                                             int64_t t0, int64_t rows, int64_t lq, float* s, const char* pf,
                                             int64_t pf_lines, float* bm, bool first) {
  __m512 acc[kGroup][V];
  for (int j = 0; j < kGroup; ++j) {
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < dim2; ++kk) {
    if ((kk & 1) == 0 && (kk >> 1) < pf_lines) _mm_prefetch(pf + (kk >> 1) * 64, _MM_HINT_T1);
    __m512bh q[V];
    for (int v = 0; v < V; ++v) q[v] = (__m512bh)_mm512_loadu_si512(qp + kk * lqp + t0 + 16 * v);
    for (int j = 0; j < kGroup; ++j) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(cg[kk * kGroup + j]));
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], a, q[v]);
    }
  }
  StoreTile<V>(acc, rows, lq, t0, s, bm, first);
}

COLBERT_JAX_BF16_TARGET void GroupsBf16(const uint32_t* c, const uint32_t* qp, int64_t dim2, int64_t lqp,
                                        int64_t p, int64_t groups, int64_t lq, int64_t g0, int64_t g1, float* s,
                                        float* bm) {
  ForGroupTiles(c, dim2 * kGroup * sizeof(uint32_t), lqp, p, groups, lq, g0, g1, s, bm,
                [&](auto vectors, int64_t g, int64_t rows, int64_t t0, const char* pf, int64_t pf_lines, float* sg,
                    float* bg, bool first) {
                  TileBf16<decltype(vectors)::value>(c + g * dim2 * kGroup, qp, dim2, lqp, t0, rows, lq, sg, pf,
                                                     pf_lines, bg, first);
                });
}
#endif

ffi::Error CentroidScoresBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> blocked, ffi::Buffer<ffi::F32> q,
                              ffi::ResultBuffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> maxima) {
  auto c_dims = blocked.dimensions();
  auto q_dims = q.dimensions();
  auto s_dims = s->dimensions();
  auto m_dims = maxima->dimensions();
  if (c_dims.size() != 4 || c_dims[2] != kGroup || c_dims[3] != 2 || q_dims.size() != 2 || s_dims.size() != 2 ||
      m_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        "centroid_scores_bf16: packed centroids [P8 / 8, dim2, 8, 2], Q [Lq, dim], S [P, Lq], maxima [P / 128, Lq]");
  }
  const int64_t groups = c_dims[0], dim2 = c_dims[1], dim = q_dims[1], lq = q_dims[0], p = s_dims[0];
  if (dim2 != (dim + 1) / 2 || s_dims[1] != lq || groups != (p + kGroup - 1) / kGroup) {
    return ffi::Error::InvalidArgument("centroid_scores_bf16: the packed centroids do not fit Q [Lq, dim], S [P, Lq]");
  }
  if (m_dims[0] != (p + kMaxBlock - 1) / kMaxBlock || m_dims[1] != lq) {
    return ffi::Error::InvalidArgument("centroid_scores_bf16: the block maxima are not [ceil(P / 128), Lq]");
  }
  if (!Bf16Ready()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "centroid_scores_bf16: no AVX-512 BF16 on this CPU");
  }
  if (p == 0 || lq == 0) return ffi::Error::Success();
#if COLBERT_JAX_HAS_BF16
  const int64_t lqp = (lq + 15) / 16 * 16;
  const float* qd = q.typed_data();
  std::vector<uint32_t> qp(dim2 * lqp, 0u);  // Q's bfloat16 pairs [dim2][lqp], zeros past dim and lq
  for (int64_t t = 0; t < lq; ++t) {
    for (int64_t k = 0; k < dim; ++k) qp[(k / 2) * lqp + t] |= static_cast<uint32_t>(ToBf16(qd[t * dim + k])) << (16 * (k % 2));
  }
  const uint32_t* c = reinterpret_cast<const uint32_t*>(blocked.untyped_data());
  float* out = s->typed_data();
  float* bm = maxima->typed_data();
  ForGroupTasks(pool, groups, p, [&](int64_t g0, int64_t g1) {
    GroupsBf16(c, qp.data(), dim2, lqp, p, groups, lq, g0, g1, out, bm);
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

extern "C" int colbert_jax_avx512_bf16_ready() { return Bf16Ready() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxCentroidScoresBf16, CentroidScoresBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
