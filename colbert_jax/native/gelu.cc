// The exact GELU after a dense layer (`colbert_jax.native.gelu`), called from XLA programs through the XLA FFI:
//   out = a / 2 * erfc(-a / sqrt(2)),  a = y + bias,
// with XLA:CPU's bits for `jax.nn.gelu(y + bias, approximate=False)` (the math and its AVX-512 path: gelu.h),
// denormals flushed (XLA runs with FTZ/DAZ). XLA computes every branch for every element; this kernel computes
// the cheap one for all and the exp, the two divisions and the tails only for the elements that select them,
// gathered 16 (AVX2: 8) at a time: the same numbers at a fraction of the arithmetic.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "gelu.h"
#include "tasks.h"
#include "xla_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::GeluScalar;
using colbert_jax_native::kErfcLarge;
using colbert_jax_native::kErfcMid;
using colbert_jax_native::kErfSmall;
using colbert_jax_native::RunTasks;
#if defined(__x86_64__)
using colbert_jax_native::GeluRowsAvx512;
using colbert_jax_native::XlaExp8;
#endif

constexpr int64_t kRowsPerTask = 16;

void RowsScalar(const float* y, const float* bias, float* out, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < n; ++j) out[r * n + j] = GeluScalar(y[r * n + j] + bias[j]);
  }
}

#if defined(__x86_64__)
// Rows [r0, r1) of a row-major [rows, n] block, a row at a time (a row's tails stay in L1).
COLBERT_JAX_GELU_TARGET void RowsAvx512(const float* y, const float* bias, float* out, int64_t r0, int64_t r1,
                                        int64_t n) {
  for (int64_t r = r0; r < r1; ++r) GeluRowsAvx512(y + r * n, n, bias, out + r * n, n, 1, n);
}

#define COLBERT_JAX_GELU_AVX2 __attribute__((target("avx2,fma")))

// GeluTail on 8 lanes (AVX2 and FMA): the same operations in the same order.
COLBERT_JAX_GELU_AVX2 inline __m256 GeluTail8(__m256 a) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 z = _mm256_mul_ps(_mm256_sub_ps(zero, a), _mm256_set1_ps(0.707106769f));
  const __m256 az = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z), z2 = _mm256_mul_ps(z, z);
  const __m256 w = _mm256_div_ps(one, z2);
  const __m256 mid = _mm256_cmp_ps(az, _mm256_set1_ps(2.0f), _CMP_LT_OQ);
  __m256 q1 = _mm256_fmadd_ps(w, _mm256_set1_ps(kErfcMid[0]), _mm256_set1_ps(kErfcMid[1]));
  for (int i = 2; i < 9; ++i) q1 = _mm256_fmadd_ps(q1, w, _mm256_set1_ps(kErfcMid[i]));
  __m256 q2 = _mm256_fmadd_ps(w, _mm256_set1_ps(kErfcLarge[0]), _mm256_set1_ps(kErfcLarge[1]));
  for (int i = 2; i < 8; ++i) q2 = _mm256_fmadd_ps(q2, w, _mm256_set1_ps(kErfcLarge[i]));
  const __m256 nz2 = _mm256_sub_ps(zero, z2);
  const __m256 ex = XlaExp8(nz2);
  __m256 big = _mm256_mul_ps(_mm256_mul_ps(ex, _mm256_div_ps(one, az)), _mm256_blendv_ps(q2, q1, mid));
  big = _mm256_blendv_ps(big, zero, _mm256_cmp_ps(nz2, _mm256_set1_ps(-88.7228394f), _CMP_LT_OQ));
  const __m256 negative = _mm256_cmp_ps(z, zero, _CMP_LT_OQ);
  const __m256 erfc = _mm256_blendv_ps(big, _mm256_sub_ps(_mm256_set1_ps(2.0f), big), negative);
  return _mm256_mul_ps(_mm256_mul_ps(a, _mm256_set1_ps(0.5f)), erfc);
}

// Lane permutations by an 8-bit mask, for AVX2's missing compress and expand: kCompress[m] moves the lanes set
// in m to the front, in order; kExpand[m] sends the front lanes back to the positions set in m.
struct LanePermutations {
  alignas(32) int32_t compress[256][8];
  alignas(32) int32_t expand[256][8];
  LanePermutations() {
    for (int m = 0; m < 256; ++m) {
      int at = 0;
      for (int lane = 0; lane < 8; ++lane) {
        compress[m][lane] = 0;
        expand[m][lane] = 0;
      }
      for (int lane = 0; lane < 8; ++lane) {
        if (m & (1 << lane)) {
          compress[m][at] = lane;
          expand[m][lane] = at++;
        }
      }
    }
  }
};
const LanePermutations kLanes;

// RowsAvx512 on 8 lanes: the |z| < 1 branch for every element, the tails gathered through kLanes.
COLBERT_JAX_GELU_AVX2 void RowsAvx2(const float* y, const float* bias, float* out, int64_t r0, int64_t r1,
                                    int64_t n) {
  thread_local std::vector<float> tails;
  thread_local std::vector<uint8_t> masks;
  if (tails.size() < static_cast<size_t>(n + 16)) tails.resize(n + 16);
  if (masks.size() < static_cast<size_t>(n / 8 + 1)) masks.resize(n / 8 + 1);
  float* const tail_buf = tails.data();  // plain pointers: see GeluBlockAvx512 (gelu.h)
  uint8_t* const mask_buf = masks.data();
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), sign = _mm256_set1_ps(-0.0f);
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t r = r0; r < r1; ++r) {
    float* o = out + r * n;
    int64_t count = 0;
    for (int64_t j = 0, v = 0; j < n; j += 8, ++v) {
      const int live = static_cast<int>(std::min<int64_t>(8, n - j));
      const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(live), lane_ids);
      const __m256 a = _mm256_add_ps(_mm256_maskload_ps(y + r * n + j, in), _mm256_maskload_ps(bias + j, in));
      const __m256 z = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), _mm256_set1_ps(0.707106769f));
      const __m256 z2 = _mm256_mul_ps(z, z);
      __m256 p = _mm256_fmadd_ps(z2, _mm256_set1_ps(kErfSmall[0]), _mm256_set1_ps(kErfSmall[1]));
      for (int i = 2; i < 7; ++i) p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(kErfSmall[i]));
      _mm256_maskstore_ps(o + j, in, _mm256_mul_ps(_mm256_mul_ps(a, half), _mm256_fnmadd_ps(z, p, one)));
      // the elements whose |z| < 1 is false (NaN included, as XLA's select takes the tail there)
      const int small = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, z), one, _CMP_LT_OQ));
      const int tail = ~small & ((1 << live) - 1);
      mask_buf[v] = static_cast<uint8_t>(tail);
      const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLanes.compress[tail]));
      _mm256_storeu_ps(tail_buf + count, _mm256_permutevar8x32_ps(a, order));
      count += __builtin_popcount(tail);
    }
    for (int64_t t = 0; t < count; t += 8) _mm256_storeu_ps(tail_buf + t, GeluTail8(_mm256_loadu_ps(tail_buf + t)));
    int64_t at = 0;
    for (int64_t j = 0, v = 0; j < n && at < count; j += 8, ++v) {
      const int tail = mask_buf[v];
      if (!tail) continue;
      const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLanes.expand[tail]));
      const __m256i chosen = _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_set1_epi32(tail),
                                                                  _mm256_sllv_epi32(_mm256_set1_epi32(1), lane_ids)),
                                                 _mm256_setzero_si256());
      const __m256 back = _mm256_permutevar8x32_ps(_mm256_loadu_ps(tail_buf + at), order);
      _mm256_maskstore_ps(o + j, chosen, back);
      at += __builtin_popcount(tail);
    }
  }
}
#endif

ffi::Error Gelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> bias,
                ffi::ResultBuffer<ffi::F32> out, int32_t vectorized) {
  auto dims = y.dimensions();
  if (dims.size() != 2 || bias.element_count() != dims[1] || out->element_count() != y.element_count()) {
    return ffi::Error::InvalidArgument("gelu: needs y [M, N], bias [N], out [M, N]");
  }
  const int64_t m = dims[0], n = dims[1];
  if (m * n >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("gelu: more than 2^31 elements");
  const float* yd = y.typed_data();
  const float* b = bias.typed_data();
  float* o = out->typed_data();
#if defined(__x86_64__)
#if defined(__AVX512F__)
  const int vector = vectorized != 0 && __builtin_cpu_supports("avx512f") ? 512 : 0;
#elif defined(__AVX2__) && defined(__FMA__)
  // built for a CPU type without AVX-512 (-march): run as there, even on a CPU that has it
  const int vector = vectorized != 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 256 : 0;
#else
  const int vector = 0;
#endif
#else
  const int vector = 0;
#endif
  const int64_t tasks = (m + kRowsPerTask - 1) / kRowsPerTask;
  RunTasks(pool, tasks, m * n / 64, 1 << 12, [=](int64_t t) {
    const int64_t r0 = t * kRowsPerTask, r1 = std::min(r0 + kRowsPerTask, m);
#if defined(__x86_64__)
    const unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040);  // XLA:CPU's flush-to-zero and denormals-are-zero
    if (vector == 512) {
      RowsAvx512(yd, b, o, r0, r1, n);
    } else if (vector == 256) {
      RowsAvx2(yd, b, o, r0, r1, n);
    } else {
      RowsScalar(yd, b, o, r0, r1, n);
    }
    _mm_setcsr(saved);
#else
    RowsScalar(yd, b, o, r0, r1, n);
#endif
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxGelu, Gelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("vectorized"));
