// Self-attention of the int8 query encoder on the CPU (`colbert_jax.native.attention`), called from XLA programs
// through the XLA FFI: one kernel for what XLA:CPU runs as three transposes of the fused query/key/value
// projection, the batched score and context products, the softmax and a transpose back.
//
// qkv [B, L, 3 * H * D] (queries, then keys, then values, head after head) and its bias [3 * H * D] (added as
// each value is read), key_bias [B, L] (0, or a large negative number for a key that is not attended) ->
// ctx [B, L, H * D]:
//   s[i, j] = q_i . k_j / sqrt(D) + key_bias[j];  p[i, :] = softmax(s[i, :]);  ctx_i = sum_j p[i, j] v_j
// for each batch row and head, as `bert._SelfAttention` computes it; exp is XLA:CPU's expansion, the sums are
// float32 in this kernel's order (not XLA's bits, but float32-accurate). Each output row depends on its batch
// row alone (batch invariance).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "tasks.h"
#include "xla_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::Bits;
using colbert_jax_native::RunTasks;
using colbert_jax_native::XlaExp;
#if defined(__x86_64__)
using colbert_jax_native::XlaExp16;
using colbert_jax_native::XlaExp8;
#endif

constexpr int64_t kMaxLength = 512;
constexpr int64_t kMaxHeadDim = 256;



// One batch row and head: q, k, v rows `stride` floats apart; ctx rows `out_stride` apart.
void AttendHead(const float* q, const float* k, const float* v, const float* bq, const float* bk, const float* bv,
                int64_t stride, const float* key_bias, int64_t len, int64_t dim, float* ctx, int64_t out_stride) {
  thread_local std::vector<float> keys;  // transposed: [dim, len]
  if (keys.size() < static_cast<size_t>(dim * len)) keys.resize(dim * len);
  float* kt = keys.data();
  alignas(64) float s[kMaxLength];
  alignas(64) float acc[kMaxHeadDim];
  for (int64_t j = 0; j < len; ++j) {
    for (int64_t d = 0; d < dim; ++d) kt[d * len + j] = k[j * stride + d] + bk[d];
  }
  const float root = std::sqrt(static_cast<float>(dim));
  for (int64_t i = 0; i < len; ++i) {
    const float* qi = q + i * stride;
    std::fill(s, s + len, 0.0f);
    for (int64_t d = 0; d < dim; ++d) {
      const float x = qi[d] + bq[d];
      const float* row = kt + d * len;
      for (int64_t j = 0; j < len; ++j) s[j] = std::fma(x, row[j], s[j]);
    }
    float top = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      s[j] = s[j] / root + key_bias[j];
      top = std::max(top, s[j]);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
      s[j] = XlaExp(s[j] - top);
      total += s[j];
    }
    std::fill(acc, acc + dim, 0.0f);
    for (int64_t j = 0; j < len; ++j) {
      const float p = s[j] / total;
      const float* vj = v + j * stride;
      for (int64_t d = 0; d < dim; ++d) acc[d] = std::fma(p, vj[d] + bv[d], acc[d]);
    }
    std::copy(acc, acc + dim, ctx + i * out_stride);
  }
}

#if defined(__x86_64__)
#define COLBERT_JAX_ATTENTION_TARGET __attribute__((target("avx512f")))


// The 16 x 16 block in r transposed in registers (r[t] holds row t; after, column t).
COLBERT_JAX_ATTENTION_TARGET inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 rows' elements 4e + c, for c = 0..3, in r[i + c]
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8) {  // 128-bit lanes of rows i..i+3 and i+4..i+7 gathered
    for (int c = 0; c < 4; ++c) {
      t[i + c] = _mm512_shuffle_f32x4(r[i + c], r[i + 4 + c], 0x88);
      t[i + 4 + c] = _mm512_shuffle_f32x4(r[i + c], r[i + 4 + c], 0xDD);
    }
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
  }
}

// AttendHead for len and dim multiples of 16, at most 64: eight query rows at a time where their sums fit in 16
// registers (else four), so that the products' accumulators are independent chains. The queries' and keys'
// biases are added once per head, into an aligned copy of the queries and the keys transposed (in 16 x 16
// register blocks), so that the score loop only loads and broadcasts. Scores are scaled by 1 / sqrt(D) and
// probabilities by 1 / their sum, multiplications in place of divisions.
//
// Only the first kJ blocks of 16 keys are read, for all `rows` (a multiple of 16, at most 64) query rows: the
// caller leaves out trailing blocks whose keys are all masked (`LiveKeyBlocks`). Their weights would be exactly
// 0 (a finfo.min score minus a real maximum clamps exp to 0), so each sum and maximum is the one over all
// blocks, bit for bit, for finite values: a short query's [MASK] padding costs no scores or value rows.
template <int kJ, int kD>
COLBERT_JAX_ATTENTION_TARGET void AttendHead16(const float* q, const float* k, const float* v, const float* bq,
                                               const float* bk, const float* bv, int64_t stride,
                                               const float* key_bias, float* ctx, int64_t out_stride, int rows) {
  constexpr int len = 16 * kJ, dim = 16 * kD, kRows = (kJ <= 2 && kD <= 2) ? 8 : 4;
  alignas(64) float kt[dim * len];     // keys + bias, transposed: [dim, len]
  alignas(64) float qs[64 * dim];      // queries + bias: [rows, dim]
  for (int db = 0; db < kD; ++db) {
    const __m512 bias_q = _mm512_loadu_ps(bq + 16 * db);
    const __m512 bias_k = _mm512_loadu_ps(bk + 16 * db);
    for (int j = 0; j < rows; ++j) {
      _mm512_store_ps(qs + j * dim + 16 * db, _mm512_add_ps(_mm512_loadu_ps(q + j * stride + 16 * db), bias_q));
    }
    for (int jb = 0; jb < kJ; ++jb) {
      __m512 block[16];
      for (int t = 0; t < 16; ++t) {
        block[t] = _mm512_add_ps(_mm512_loadu_ps(k + (16 * jb + t) * stride + 16 * db), bias_k);
      }
      Transpose16(block);
      for (int t = 0; t < 16; ++t) _mm512_store_ps(kt + (16 * db + t) * len + 16 * jb, block[t]);
    }
  }
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(dim)));
  __m512 bias[kJ];
  for (int jb = 0; jb < kJ; ++jb) bias[jb] = _mm512_loadu_ps(key_bias + 16 * jb);
  alignas(64) float p[kRows][len];
  for (int i0 = 0; i0 < rows; i0 += kRows) {
    __m512 s[kRows][kJ];
    for (int r = 0; r < kRows; ++r)
      for (int jb = 0; jb < kJ; ++jb) s[r][jb] = _mm512_setzero_ps();
    for (int d = 0; d < dim; ++d) {
      __m512 col[kJ];
      for (int jb = 0; jb < kJ; ++jb) col[jb] = _mm512_load_ps(kt + d * len + 16 * jb);
      for (int r = 0; r < kRows; ++r) {
        const __m512 x = _mm512_set1_ps(qs[(i0 + r) * dim + d]);
        for (int jb = 0; jb < kJ; ++jb) s[r][jb] = _mm512_fmadd_ps(x, col[jb], s[r][jb]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      __m512 top = _mm512_set1_ps(-INFINITY);
      for (int jb = 0; jb < kJ; ++jb) {
        s[r][jb] = _mm512_fmadd_ps(s[r][jb], scale, bias[jb]);
        top = _mm512_max_ps(top, s[r][jb]);
      }
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
      __m512 sum = _mm512_setzero_ps();
      for (int jb = 0; jb < kJ; ++jb) {
        s[r][jb] = XlaExp16(_mm512_sub_ps(s[r][jb], m));
        sum = _mm512_add_ps(sum, s[r][jb]);
      }
      const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
      for (int jb = 0; jb < kJ; ++jb) _mm512_store_ps(p[r] + 16 * jb, _mm512_mul_ps(s[r][jb], inverse));
    }
    __m512 acc[kRows][kD];
    for (int r = 0; r < kRows; ++r)
      for (int db = 0; db < kD; ++db) acc[r][db] = _mm512_setzero_ps();
    __m512 bias_v[kD];
    for (int db = 0; db < kD; ++db) bias_v[db] = _mm512_loadu_ps(bv + 16 * db);
    for (int j = 0; j < len; ++j) {
      __m512 vj[kD];
      for (int db = 0; db < kD; ++db) vj[db] = _mm512_add_ps(_mm512_loadu_ps(v + j * stride + 16 * db), bias_v[db]);
      for (int r = 0; r < kRows; ++r) {
        const __m512 w = _mm512_set1_ps(p[r][j]);
        for (int db = 0; db < kD; ++db) acc[r][db] = _mm512_fmadd_ps(w, vj[db], acc[r][db]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int db = 0; db < kD; ++db) _mm512_storeu_ps(ctx + (i0 + r) * out_stride + 16 * db, acc[r][db]);
  }
}

#define COLBERT_JAX_ATTENTION_AVX2 __attribute__((target("avx2,fma")))

// AttendHead16 on AVX2's 8-lane registers (16 of them, against AVX-512's 32): len and dim multiples of 8, at
// most 64; two query rows at a time where a row's sums fit in four registers, else one.
template <int kJ, int kD>
COLBERT_JAX_ATTENTION_AVX2 void AttendHead8(const float* q, const float* k, const float* v, const float* bq,
                                            const float* bk, const float* bv, int64_t stride, const float* key_bias,
                                            float* ctx, int64_t out_stride, int /*rows: always len here*/) {
  constexpr int len = 8 * kJ, dim = 8 * kD, kRows = (kJ <= 4 && kD <= 4) ? 2 : 1;
  alignas(32) float kt[dim * len];  // keys transposed: [dim, len]
  for (int j = 0; j < len; ++j) {
    for (int d = 0; d < dim; ++d) kt[d * len + j] = k[j * stride + d] + bk[d];
  }
  const __m256 root = _mm256_set1_ps(std::sqrt(static_cast<float>(dim)));
  alignas(32) float p[kRows][len];
  alignas(32) float lanes[8];
  for (int i0 = 0; i0 < len; i0 += kRows) {
    __m256 s[kRows][kJ];
    for (int r = 0; r < kRows; ++r)
      for (int jb = 0; jb < kJ; ++jb) s[r][jb] = _mm256_setzero_ps();
    for (int d = 0; d < dim; ++d) {
      __m256 col[kJ];
      for (int jb = 0; jb < kJ; ++jb) col[jb] = _mm256_load_ps(kt + d * len + 8 * jb);
      for (int r = 0; r < kRows; ++r) {
        const __m256 x = _mm256_set1_ps(q[(i0 + r) * stride + d] + bq[d]);
        for (int jb = 0; jb < kJ; ++jb) s[r][jb] = _mm256_fmadd_ps(x, col[jb], s[r][jb]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      __m256 top = _mm256_set1_ps(-INFINITY);
      for (int jb = 0; jb < kJ; ++jb) {
        s[r][jb] = _mm256_add_ps(_mm256_div_ps(s[r][jb], root), _mm256_loadu_ps(key_bias + 8 * jb));
        top = _mm256_max_ps(top, s[r][jb]);
      }
      _mm256_store_ps(lanes, top);
      const __m256 m = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
      __m256 sum = _mm256_setzero_ps();
      for (int jb = 0; jb < kJ; ++jb) {
        s[r][jb] = XlaExp8(_mm256_sub_ps(s[r][jb], m));
        sum = _mm256_add_ps(sum, s[r][jb]);
      }
      _mm256_store_ps(lanes, sum);
      float total = 0.0f;
      for (float x : lanes) total += x;
      const __m256 t = _mm256_set1_ps(total);
      for (int jb = 0; jb < kJ; ++jb) _mm256_store_ps(p[r] + 8 * jb, _mm256_div_ps(s[r][jb], t));
    }
    __m256 acc[kRows][kD];
    for (int r = 0; r < kRows; ++r)
      for (int db = 0; db < kD; ++db) acc[r][db] = _mm256_setzero_ps();
    for (int j = 0; j < len; ++j) {
      __m256 vj[kD];
      for (int db = 0; db < kD; ++db) {
        vj[db] = _mm256_add_ps(_mm256_loadu_ps(v + j * stride + 8 * db), _mm256_loadu_ps(bv + 8 * db));
      }
      for (int r = 0; r < kRows; ++r) {
        const __m256 w = _mm256_set1_ps(p[r][j]);
        for (int db = 0; db < kD; ++db) acc[r][db] = _mm256_fmadd_ps(w, vj[db], acc[r][db]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int db = 0; db < kD; ++db) _mm256_storeu_ps(ctx + (i0 + r) * out_stride + 8 * db, acc[r][db]);
  }
}

using HeadFn = void (*)(const float*, const float*, const float*, const float*, const float*, const float*, int64_t,
                        const float*, float*, int64_t, int);

template <int kJ>
HeadFn PickDim(int64_t dim) {
  switch (dim) {
    case 16: return AttendHead16<kJ, 1>;
    case 32: return AttendHead16<kJ, 2>;
    case 48: return AttendHead16<kJ, 3>;
    case 64: return AttendHead16<kJ, 4>;
    default: return nullptr;
  }
}

template <int kJ>
HeadFn PickDim8(int64_t dim) {
  switch (dim) {
    case 8: return AttendHead8<kJ, 1>;
    case 16: return AttendHead8<kJ, 2>;
    case 24: return AttendHead8<kJ, 3>;
    case 32: return AttendHead8<kJ, 4>;
    case 40: return AttendHead8<kJ, 5>;
    case 48: return AttendHead8<kJ, 6>;
    case 56: return AttendHead8<kJ, 7>;
    case 64: return AttendHead8<kJ, 8>;
    default: return nullptr;
  }
}

// The vector version for these sizes, if there is one: AVX-512's where the -march built for and the CPU have
// it, else AVX2's where they have AVX2 and FMA (a build for an older type runs as there, even on this CPU).
// `len` there is the keys read: AVX-512's reads `blocks` of 16 (LiveKeyBlocks) for all the rows.
HeadFn VectorHead(int64_t len, int64_t dim) {
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return nullptr;
  switch (len) {
    case 16: return PickDim<1>(dim);
    case 32: return PickDim<2>(dim);
    case 48: return PickDim<3>(dim);
    case 64: return PickDim<4>(dim);
    default: return nullptr;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return nullptr;
  switch (len) {
    case 8: return PickDim8<1>(dim);
    case 16: return PickDim8<2>(dim);
    case 24: return PickDim8<3>(dim);
    case 32: return PickDim8<4>(dim);
    case 40: return PickDim8<5>(dim);
    case 48: return PickDim8<6>(dim);
    case 56: return PickDim8<7>(dim);
    case 64: return PickDim8<8>(dim);
    default: return nullptr;
  }
#else
  return nullptr;
#endif
}
#else
using HeadFn = void (*)(const float*, const float*, const float*, const float*, const float*, const float*, int64_t,
                        const float*, float*, int64_t, int);
HeadFn VectorHead(int64_t, int64_t) { return nullptr; }
#endif

// The blocks of 16 keys AttendHead16 must read for a batch row of `len` keys (a multiple of 16): up to the last
// block holding an attended key (bias above finfo.min / 2, as the encoder marks them), or all of them when none
// is attended (then every weight is the same as computed over all keys).
int64_t LiveKeyBlocks(const float* key_bias, int64_t len) {
  constexpr float kMasked = -std::numeric_limits<float>::max() / 2;
  for (int64_t j = len - 1; j >= 0; --j) {
    if (!(key_bias[j] <= kMasked)) return j / 16 + 1;  // a NaN bias counts as attended
  }
  return len / 16;
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> qkv_bias,
                     ffi::Buffer<ffi::F32> key_bias, ffi::ResultBuffer<ffi::F32> ctx, int32_t heads) {
  auto dims = qkv.dimensions();
  auto b_dims = key_bias.dimensions();
  auto o_dims = ctx->dimensions();
  if (dims.size() != 3 || b_dims.size() != 2 || o_dims.size() != 3 || heads <= 0) {
    return ffi::Error::InvalidArgument("attention: needs qkv [B, L, 3 * H * D], key_bias [B, L], ctx [B, L, H * D]");
  }
  const int64_t batch = dims[0], len = dims[1], width = dims[2];
  const int64_t hidden = width / 3, dim = hidden / heads;
  if (width % 3 || hidden % heads || b_dims[0] != batch || b_dims[1] != len || o_dims[0] != batch ||
      o_dims[1] != len || o_dims[2] != hidden || len > kMaxLength || dim > kMaxHeadDim ||
      qkv_bias.element_count() != width) {
    return ffi::Error::InvalidArgument("attention: operand shapes do not fit together (or L > 512, D > 256)");
  }
  const float* x = qkv.typed_data();
  const float* bias = key_bias.typed_data();
  const float* pb = qkv_bias.typed_data();
  float* out = ctx->typed_data();
  const int64_t tasks = batch * heads;
  const HeadFn vector = VectorHead(len, dim);
#if defined(__AVX512F__)
  HeadFn by_blocks[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};  // AVX-512's head for 1..4 blocks of keys
  const bool blocked = vector != nullptr && len % 16 == 0;
  if (blocked) {
    for (int64_t n = 1; n <= len / 16; ++n) by_blocks[n] = VectorHead(16 * n, dim);
  }
#endif
  RunTasks(pool, tasks, tasks * len * len * dim / 64, 1 << 14, [=](int64_t t) {
#if defined(__x86_64__)
    const unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040);  // XLA:CPU's flush-to-zero and denormals-are-zero
#endif
    const int64_t b = t / heads, h = t % heads;
    const float* base = x + b * len * width + h * dim;
    const float* hb = pb + h * dim;
    HeadFn head = vector;
#if defined(__AVX512F__)
    if (blocked) head = by_blocks[LiveKeyBlocks(bias + b * len, len)];
#endif
    if (head != nullptr) {
      head(base, base + hidden, base + 2 * hidden, hb, hb + hidden, hb + 2 * hidden, width, bias + b * len,
           out + b * len * hidden + h * dim, hidden, static_cast<int>(len));
    } else {
      AttendHead(base, base + hidden, base + 2 * hidden, hb, hb + hidden, hb + 2 * hidden, width, bias + b * len, len,
                 dim, out + b * len * hidden + h * dim, hidden);
    }
#if defined(__x86_64__)
    _mm_setcsr(saved);
#endif
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("heads"));
