// PLAID's stage 1 product on int8 operands with AVX-512 VNNI (`vpdpbusd`: four byte products a lane an
// instruction, twice `vdpbf16ps`' two), for CPUs without AMX-BF16 (`colbert_jax.native.centroid_scores_int8`):
// S [P, Lq] from each centroid and each query token quantized to int8 with its own scale, stored as float16
// (rounded to nearest even), and each token's maximum over each block of 128 centroids of that S, as float32.
// float16 holds these scores (cosines, |S| <= 1 up to int8's rounding) to 2^-11 of their size, well inside
// int8's error, in half the bytes: at 65,536 centroids S is 4 MiB a query instead of 8, written here and read by
// pruning and stages 4-5 (most of this kernel's time at that size went to writing S).
//
// S feeds candidate generation and pruning (stages 1-5) only: stage 6 recomputes q . c in float32 for the
// survivors' rows, so final scores keep float32's centroid part (`placement.stage1_precision`).
//
// A row x (a centroid, or a query token) is quantized as
//   m = max |x_k|,  code_k = rint(x_k * (127 / m)) (nearest even, within [-127, 127]),  scale = m * (1 / 127)
// (all codes 0 and scale 0 for m = 0). The centroids arrive packed (`colbert_jax.native.block_centroids_int8`):
// codes [ceil(P / 8)][ceil(dim / 4)][8][4], a group's 8 rows' coordinate quads adjacent (zeros past P and dim),
// and terms [ceil(P / 8) * 8][2]: each row's scale and 128 * sum of its codes. Q is quantized here, offset by
// 128 to unsigned bytes (`vpdpbusd` multiplies unsigned by signed bytes) and transposed to quads [dim4][lqp].
//
// Every integer sum is exact (|terms| < 2^24 for dim <= 512), so the order of the products does not matter:
//   S[p, t] = float16(((float(sum_k (qcode_tk + 128) * ccode_pk) - correction_p) * scale_p) * qscale_t)
// two float32 products, in that order, then rounded: the bits of `candidates._int8_product`'s XLA twin.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define COLBERT_JAX_HAS_STAGE1_INT8 1
#include <immintrin.h>
#endif

#include "centroid_tiles.h"
#include "tasks.h"
#include "vnni.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::ForGroupTasks;
#if COLBERT_JAX_HAS_STAGE1_INT8
using colbert_jax_native::Dpbusd;
using colbert_jax_native::ForGroupTiles;
using colbert_jax_native::I32x16;
using colbert_jax_native::StoreTile;
using colbert_jax_native::ZeroI32x16;
#endif

constexpr int64_t kGroup = colbert_jax_native::kTileGroup;
constexpr int64_t kMaxBlock = colbert_jax_native::kTileBlock;
constexpr int64_t kMaxDim = 512;          // the integer sums stay exact in float32 up to this

bool Int8Ready() {
#if COLBERT_JAX_HAS_STAGE1_INT8
  return true;  // compiled only for a CPU type with AVX-512 VNNI (the library's -march)
#else
  return false;
#endif
}

// One query token's codes (unsigned: code + 128) and scale, by the quantization above (finite x).
float QuantizeToken(const float* x, int64_t dim, uint8_t* out) {
  float m = 0.0f;
  for (int64_t k = 0; k < dim; ++k) m = std::max(m, std::fabs(x[k]));
  if (!(m > 0.0f)) {  // zeros (padding tokens): all codes 0, scale 0
    std::fill(out, out + dim, static_cast<uint8_t>(128));
    return 0.0f;
  }
  const float inv = 127.0f / m;
  for (int64_t k = 0; k < dim; ++k) {
    const float code = std::min(127.0f, std::max(-127.0f, std::nearbyint(x[k] * inv)));
    out[k] = static_cast<uint8_t>(static_cast<int>(code) + 128);
  }
  return m * (1.0f / 127.0f);
}

#if COLBERT_JAX_HAS_STAGE1_INT8
// One group x V vectors of 16 tokens starting at token t0 (qq: Q's unsigned quads [dim4][lqp]; qs: the tokens'
// scales [lqp]); as TileBf16 in centroid_scores_bf16.cc, with the group's terms (scale, correction) applied to
// the exact integer sums before the tile's rows go to S and its block's maxima.
template <int V>
inline void TileInt8(const uint32_t* cg, const float* terms, const uint32_t* qq, const float* qs, int64_t dim4,
                     int64_t lqp, int64_t t0, int64_t rows, int64_t lq, uint16_t* s, const char* pf, int64_t pf_lines,
                     float* bm, bool first) {
  I32x16 acc[kGroup][V];
  for (int j = 0; j < kGroup; ++j) {
    for (int v = 0; v < V; ++v) acc[j][v] = ZeroI32x16();
  }
  for (int64_t kq = 0; kq < dim4; ++kq) {
    if ((kq & 1) == 0 && (kq >> 1) < pf_lines) _mm_prefetch(pf + (kq >> 1) * 64, _MM_HINT_T1);
    __m512i q[V];
    for (int v = 0; v < V; ++v) q[v] = _mm512_loadu_si512(qq + kq * lqp + t0 + 16 * v);
    for (int j = 0; j < kGroup; ++j) {
      const __m512i c = _mm512_set1_epi32(static_cast<int>(cg[kq * kGroup + j]));
      for (int v = 0; v < V; ++v) acc[j][v] = Dpbusd(acc[j][v], q[v], c);
    }
  }
  __m512 out[kGroup][V];
  for (int v = 0; v < V; ++v) {
    const __m512 token_scale = _mm512_loadu_ps(qs + t0 + 16 * v);
    for (int j = 0; j < kGroup; ++j) {
      const __m512 dot = _mm512_sub_ps(_mm512_cvtepi32_ps((__m512i)acc[j][v]), _mm512_set1_ps(terms[2 * j + 1]));
      out[j][v] = _mm512_mul_ps(_mm512_mul_ps(dot, _mm512_set1_ps(terms[2 * j])), token_scale);
    }
  }
  StoreTile<V>(out, rows, lq, t0, s, bm, first);
}
#endif

ffi::Error CentroidScoresInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> packed, ffi::Buffer<ffi::F32> terms,
                              ffi::Buffer<ffi::F32> q, ffi::ResultBuffer<ffi::F16> s,
                              ffi::ResultBuffer<ffi::F32> maxima) {
  auto c_dims = packed.dimensions();
  auto t_dims = terms.dimensions();
  auto q_dims = q.dimensions();
  auto s_dims = s->dimensions();
  auto m_dims = maxima->dimensions();
  if (c_dims.size() != 4 || c_dims[2] != kGroup || c_dims[3] != 4 || t_dims.size() != 2 || t_dims[1] != 2 ||
      q_dims.size() != 2 || s_dims.size() != 2 || m_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        "centroid_scores_int8: packed centroids [P8 / 8, dim4, 8, 4], terms [P8, 2], Q [Lq, dim], S [P, Lq], "
        "maxima [P / 128, Lq]");
  }
  const int64_t groups = c_dims[0], dim4 = c_dims[1], dim = q_dims[1], lq = q_dims[0], p = s_dims[0];
  if (dim4 != (dim + 3) / 4 || dim > kMaxDim || s_dims[1] != lq || groups != (p + kGroup - 1) / kGroup ||
      t_dims[0] != groups * kGroup) {
    return ffi::Error::InvalidArgument("centroid_scores_int8: the packed centroids do not fit Q [Lq, dim], S [P, Lq]");
  }
  if (m_dims[0] != (p + kMaxBlock - 1) / kMaxBlock || m_dims[1] != lq) {
    return ffi::Error::InvalidArgument("centroid_scores_int8: the block maxima are not [ceil(P / 128), Lq]");
  }
  if (!Int8Ready()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "centroid_scores_int8: not built with AVX-512 VNNI");
  }
  if (p == 0 || lq == 0) return ffi::Error::Success();
#if COLBERT_JAX_HAS_STAGE1_INT8
  const int64_t lqp = (lq + 15) / 16 * 16;
  const float* qd = q.typed_data();
  std::vector<uint8_t> codes(lqp * dim4 * 4, 128);  // [lqp][dim4 * 4]: code + 128, zero codes past dim and lq
  std::vector<float> qs(lqp, 0.0f);
  for (int64_t t = 0; t < lq; ++t) qs[t] = QuantizeToken(qd + t * dim, dim, codes.data() + t * dim4 * 4);
  const int8_t* c = reinterpret_cast<const int8_t*>(packed.untyped_data());
  const float* tm = terms.typed_data();
  uint16_t* out = reinterpret_cast<uint16_t*>(s->untyped_data());
  float* bm = maxima->typed_data();
  std::vector<uint32_t> qq(dim4 * lqp);  // the quads transposed: [dim4][lqp]
  for (int64_t t = 0; t < lqp; ++t) {
    for (int64_t kq = 0; kq < dim4; ++kq) std::memcpy(&qq[kq * lqp + t], codes.data() + t * dim4 * 4 + kq * 4, 4);
  }
  const uint32_t* cw = reinterpret_cast<const uint32_t*>(c);
  ForGroupTasks(pool, groups, p, [&](int64_t g0, int64_t g1) {
    ForGroupTiles(cw, dim4 * kGroup * sizeof(uint32_t), lqp, p, groups, lq, g0, g1, out, bm,
                  [&](auto vectors, int64_t g, int64_t rows, int64_t t0, const char* pf, int64_t pf_lines, uint16_t* sg,
                      float* bg, bool first) {
                    TileInt8<decltype(vectors)::value>(cw + g * dim4 * kGroup, tm + g * kGroup * 2, qq.data(),
                                                       qs.data(), dim4, lqp, t0, rows, lq, sg, pf, pf_lines, bg,
                                                       first);
                  });
  });
#endif
  return ffi::Error::Success();
}

}  // namespace

extern "C" int colbert_jax_stage1_int8_ready() { return Int8Ready() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxCentroidScoresInt8, CentroidScoresInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
