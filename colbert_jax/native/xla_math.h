// XLA:CPU's float32 exp, reproduced: the native kernels that stand in for XLA ops use it to give XLA's bits
// (gelu.cc) or XLA's exp (attention.cc). Its expansion as XLA's machine code computes it: clamp, a power-of-two
// split, a degree-5 polynomial, each product and sum XLA contracts into one FMA contracted here too.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace colbert_jax_native {

inline float Bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float XlaExp(float x) {
  x = x >= -87.8f ? x : -87.8f;
  x = x <= 88.8f ? x : 88.8f;
  float fx = std::floor(std::fma(x, Bits(0x3FB8AA3B), 0.5f));
  fx = fx >= -127.0f ? fx : -127.0f;
  fx = fx <= 127.0f ? fx : 127.0f;
  float r = std::fma(-Bits(0x3F318000), fx, x);
  r = std::fma(-Bits(0xB95E8083), fx, r);
  float e = std::fma(r, Bits(0x39506967), Bits(0x3AB743CE));
  e = std::fma(e, r, Bits(0x3C088908));
  e = std::fma(e, r, Bits(0x3D2AA9C1));
  e = std::fma(e, r, Bits(0x3E2AAAAA));
  e = std::fma(e, r, 0.5f);
  const float t = 1.0f + std::fma(e, r * r, r);
  return t * Bits(static_cast<uint32_t>(static_cast<int32_t>(fx) + 127) << 23);
}

#if defined(__x86_64__)
// XlaExp on 16 lanes (max/min with the bound first keep a NaN, as XLA's compare-and-select does).
__attribute__((target("avx512f"))) inline __m512 XlaExp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-87.8f), x));
  __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(Bits(0x3FB8AA3B)), _mm512_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  fx = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), fx));
  __m512 r = _mm512_fnmadd_ps(_mm512_set1_ps(Bits(0x3F318000)), fx, x);
  r = _mm512_fnmadd_ps(_mm512_set1_ps(Bits(0xB95E8083)), fx, r);
  __m512 e = _mm512_fmadd_ps(r, _mm512_set1_ps(Bits(0x39506967)), _mm512_set1_ps(Bits(0x3AB743CE)));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(Bits(0x3C088908)));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(Bits(0x3D2AA9C1)));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(Bits(0x3E2AAAAA)));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  const __m512 t = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(e, _mm512_mul_ps(r, r), r));
  const __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(t, _mm512_castsi512_ps(pow2));
}

// XlaExp on 8 lanes, for CPUs with AVX2 and FMA but not AVX-512 (the same operations in the same order).
__attribute__((target("avx2,fma"))) inline __m256 XlaExp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.8f), _mm256_max_ps(_mm256_set1_ps(-87.8f), x));
  __m256 fx = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(Bits(0x3FB8AA3B)), _mm256_set1_ps(0.5f)),
                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  fx = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), fx));
  __m256 r = _mm256_fnmadd_ps(_mm256_set1_ps(Bits(0x3F318000)), fx, x);
  r = _mm256_fnmadd_ps(_mm256_set1_ps(Bits(0xB95E8083)), fx, r);
  __m256 e = _mm256_fmadd_ps(r, _mm256_set1_ps(Bits(0x39506967)), _mm256_set1_ps(Bits(0x3AB743CE)));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(Bits(0x3C088908)));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(Bits(0x3D2AA9C1)));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(Bits(0x3E2AAAAA)));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
  const __m256 t = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(e, _mm256_mul_ps(r, r), r));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(t, _mm256_castsi256_ps(pow2));
}
#endif

}  // namespace colbert_jax_native
