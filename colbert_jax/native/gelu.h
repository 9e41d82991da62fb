// The exact GELU with XLA:CPU's bits, shared by gelu.cc (GELU after a product XLA ran) and dense_bf16.cc (GELU in
// the product's epilogue, on its output while in cache): `jax.nn.gelu(a, approximate=False)` as
//   a / 2 * erfc(-a / sqrt(2))
// with erfc by the expansions jax lowers it to (a polynomial for |z| < 1; exp(-z^2) / |z| times one of two
// rational tails beyond), exp by XLA's own expansion (xla_math.h), each product and sum XLA's machine code
// contracts into one FMA contracted here too. Callers run it with denormals flushed (FTZ/DAZ), as XLA:CPU does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla_math.h"

namespace colbert_jax_native {

// jax's erfc expansion (float32 coefficients): |z| < 1, then the tails for 1 <= |z| < 2 and |z| >= 2.
inline constexpr float kErfSmall[7] = {7.85386146e-05f, -0.000801019371f, 0.00518832775f, -0.0268538129f,
                                       0.112835854f,    -0.37612626f,     1.12837911f};
inline constexpr float kErfcMid[9] = {0.0232682f,    -0.138703942f, 0.368742466f,  -0.582473278f, 0.621000469f,
                                      -0.494451523f, 0.340488f,     -0.274112701f, 0.563825965f};
inline constexpr float kErfcLarge[8] = {-10.477664f,  12.9772f,    -7.49551868f,  2.92101908f,
                                        -1.01526523f, 0.42184633f, -0.282076746f, 0.564189494f};

// The exact GELU of a, all branches (the reference the vector paths equal).
inline float GeluScalar(float a) {
  const float z = (-a) * 0.707106769f, az = std::fabs(z), z2 = z * z;
  float p = std::fma(z2, kErfSmall[0], kErfSmall[1]);
  for (int i = 2; i < 7; ++i) p = std::fma(p, z2, kErfSmall[i]);
  const float small = std::fma(-z, p, 1.0f);
  const float w = 1.0f / z2;
  float q1 = std::fma(w, kErfcMid[0], kErfcMid[1]);
  for (int i = 2; i < 9; ++i) q1 = std::fma(q1, w, kErfcMid[i]);
  float q2 = std::fma(w, kErfcLarge[0], kErfcLarge[1]);
  for (int i = 2; i < 8; ++i) q2 = std::fma(q2, w, kErfcLarge[i]);
  float big = XlaExp(-z2) * (1.0f / az) * (az < 2.0f ? q1 : q2);
  big = -z2 < -88.7228394f ? 0.0f : big;
  const float erfc = az < 1.0f ? small : (z < 0.0f ? 2.0f - big : big);
  return (a * 0.5f) * erfc;
}

#if defined(__x86_64__)
#define COLBERT_JAX_GELU_TARGET __attribute__((target("avx512f")))

// The |z| >= 1 branch of GeluScalar on 16 lanes.
COLBERT_JAX_GELU_TARGET inline __m512 GeluTail(__m512 a) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  const __m512 z = _mm512_mul_ps(_mm512_sub_ps(zero, a), _mm512_set1_ps(0.707106769f));
  const __m512 az = _mm512_abs_ps(z), z2 = _mm512_mul_ps(z, z);
  const __m512 w = _mm512_div_ps(one, z2);
  const __mmask16 mid = _mm512_cmp_ps_mask(az, _mm512_set1_ps(2.0f), _CMP_LT_OQ);
  __m512 q1 = _mm512_fmadd_ps(w, _mm512_set1_ps(kErfcMid[0]), _mm512_set1_ps(kErfcMid[1]));
  for (int i = 2; i < 9; ++i) q1 = _mm512_fmadd_ps(q1, w, _mm512_set1_ps(kErfcMid[i]));
  __m512 q2 = _mm512_fmadd_ps(w, _mm512_set1_ps(kErfcLarge[0]), _mm512_set1_ps(kErfcLarge[1]));
  for (int i = 2; i < 8; ++i) q2 = _mm512_fmadd_ps(q2, w, _mm512_set1_ps(kErfcLarge[i]));
  const __m512 nz2 = _mm512_sub_ps(zero, z2);
  const __m512 ex = XlaExp16(nz2);
  __m512 big = _mm512_mul_ps(_mm512_mul_ps(ex, _mm512_div_ps(one, az)), _mm512_mask_blend_ps(mid, q2, q1));
  big = _mm512_mask_mov_ps(big, _mm512_cmp_ps_mask(nz2, _mm512_set1_ps(-88.7228394f), _CMP_LT_OQ), zero);
  const __mmask16 negative = _mm512_cmp_ps_mask(z, zero, _CMP_LT_OQ);
  const __m512 erfc = _mm512_mask_blend_ps(negative, big, _mm512_sub_ps(_mm512_set1_ps(2.0f), big));
  return _mm512_mul_ps(_mm512_mul_ps(a, _mm512_set1_ps(0.5f)), erfc);
}

// out = gelu(y + bias) for `rows` rows of n columns (row strides ldy and ldo; out may be y): every element's
// |z| < 1 branch, then the elements that need the tail gathered (in order, by register compresses) over all the
// rows, their tails 16 at a time, and each expanded back into its vector. XLA computes every branch for every
// element; this computes the exp, the two divisions and the tails only for the elements that select them.
COLBERT_JAX_GELU_TARGET inline void GeluBlockAvx512(const float* y, int64_t ldy, const float* bias, float* out,
                                                    int64_t ldo, int64_t rows, int64_t n) {
  const int64_t per_row = (n + 15) / 16;
  thread_local std::vector<float> tails;
  thread_local std::vector<uint16_t> masks;
  if (tails.size() < static_cast<size_t>(rows * per_row * 16 + 16)) tails.resize(rows * per_row * 16 + 16);
  if (masks.size() < static_cast<size_t>(rows * per_row)) masks.resize(rows * per_row);
  // Plain pointers for the loops: through the thread_local vectors, every access after a vector store (which may
  // alias anything) went back through __tls_get_addr, a call with vzeroupper and spilled registers per vector.
  float* const tail_buf = tails.data();
  uint16_t* const mask_buf = masks.data();
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y + r * ldy;
    float* o = out + r * ldo;
    for (int64_t j = 0, v = 0; j < n; j += 16, ++v) {
      const __mmask16 in = n - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 a = _mm512_add_ps(_mm512_maskz_loadu_ps(in, yr + j), _mm512_maskz_loadu_ps(in, bias + j));
      const __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), _mm512_set1_ps(0.707106769f));
      const __m512 z2 = _mm512_mul_ps(z, z);
      __m512 p = _mm512_fmadd_ps(z2, _mm512_set1_ps(kErfSmall[0]), _mm512_set1_ps(kErfSmall[1]));
      for (int i = 2; i < 7; ++i) p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(kErfSmall[i]));
      _mm512_mask_storeu_ps(o + j, in, _mm512_mul_ps(_mm512_mul_ps(a, half), _mm512_fnmadd_ps(z, p, one)));
      // the elements whose |z| < 1 is false (NaN included, as XLA's select takes the tail there)
      const __mmask16 tail = in & ~_mm512_cmp_ps_mask(_mm512_abs_ps(z), one, _CMP_LT_OQ);
      mask_buf[r * per_row + v] = tail;
      _mm512_storeu_ps(tail_buf + count, _mm512_maskz_compress_ps(tail, a));
      count += __builtin_popcount(tail);
    }
  }
  for (int64_t t = 0; t < count; t += 16) {
    _mm512_storeu_ps(tail_buf + t, GeluTail(_mm512_loadu_ps(tail_buf + t)));
  }
  int64_t at = 0;
  for (int64_t r = 0; r < rows && at < count; ++r) {
    float* o = out + r * ldo;
    for (int64_t j = 0, v = 0; j < n; j += 16, ++v) {
      const __mmask16 tail = mask_buf[r * per_row + v];
      if (!tail) continue;
      const __mmask16 in = n - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - j)) - 1);
      const __m512 back = _mm512_loadu_ps(tail_buf + at);
      _mm512_mask_storeu_ps(o + j, in, _mm512_mask_expand_ps(_mm512_maskz_loadu_ps(in, o + j), tail, back));
      at += __builtin_popcount(tail);
    }
  }
}

// GeluBlockAvx512 over runs of rows of about kGeluRun elements, so that a run's output and gathered tails stay
// in L1 between its passes (the tails of a whole [256, 48] panel block or [64, 384] task went to L2).
constexpr int64_t kGeluRun = 2048;
COLBERT_JAX_GELU_TARGET inline void GeluRowsAvx512(const float* y, int64_t ldy, const float* bias, float* out,
                                                   int64_t ldo, int64_t rows, int64_t n) {
  const int64_t run = std::max<int64_t>(1, kGeluRun / std::max<int64_t>(n, 1));
  for (int64_t r = 0; r < rows; r += run) {
    GeluBlockAvx512(y + r * ldy, ldy, bias, out + r * ldo, ldo, std::min(run, rows - r), n);
  }
}
#endif

// Whether GeluRowsAvx512 runs here: a build for an AVX-512 CPU type (-march) on a CPU with AVX-512F (a build for
// an older type runs as there, even on this CPU).
inline bool GeluVectorReady() {
#if defined(__x86_64__) && defined(__AVX512F__)
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// out = gelu(out + bias) in place over a [rows, width] block (row stride ld): GeluRowsAvx512 where `vector`
// (check GeluVectorReady()), else GeluScalar, the same bits. For the kernels that apply the GELU in a product's
// epilogue, on its output while in cache; the caller flushes denormals (FlushDenormals).
inline void GeluInPlace(float* out, int64_t ld, const float* bias, int64_t rows, int64_t width, bool vector) {
#if defined(__x86_64__)
  if (vector) {
    GeluRowsAvx512(out, ld, bias, out, ld, rows, width);
    return;
  }
#else
  (void)vector;
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) out[r * ld + j] = GeluScalar(out[r * ld + j] + bias[j]);
  }
}

// XLA:CPU's flush-to-zero and denormals-are-zero in MXCSR while in scope, as XLA runs its GELU.
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__x86_64__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);
#endif
  }
  ~FlushDenormals() {
#if defined(__x86_64__)
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned int saved_ = 0;
};

}  // namespace colbert_jax_native
