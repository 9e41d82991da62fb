// One core's multiply-add rates by instruction, for choosing the query encoder's products
// (`colbert_jax.native.int8_over_f32_rate`, `bf16_over_f32_rate`, `query_products_by_speed`) and stage 6's
// kernel (`full_width_fma`): int8 multiply-adds
// (`vpdpbusd`, 64 a 512-bit instruction), int16 ones (`vpdpwssd`, 32) and bfloat16 ones (`vdpbf16ps`, 32) over
// float32 ones (`vfmadd`, 16), and float32 ones on 256-bit vectors (8).
// Each is a register-resident loop of 16 independent chains, timed alternately with float32's, the fastest of 5
// turns each (a few milliseconds in all); the Python side rounds each to a power of two, so that load on the
// machine does not change the choice. Measured on AMD Zen 4 and Zen 5: int8 4x float32, bfloat16 and int16 2x.

#include <algorithm>
#include <chrono>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "vnni.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr long kSteps = 40000;
constexpr int kTurns = 5;

#define COLBERT_JAX_CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

#if defined(__AVX512F__)
inline __m512 Splat(float x, __m512) { return _mm512_set1_ps(x); }
inline __m256 Splat(float x, __m256) { return _mm256_set1_ps(x); }
inline __m512 Fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m256 Fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline float FirstLane(__m512 v) { return _mm512_cvtss_f32(v); }
inline float FirstLane(__m256 v) { return _mm256_cvtss_f32(v); }

// Seconds for kSteps x 16 float32 FMAs on vectors V; `sink` keeps the chains' results live. On 256-bit vectors
// (8 multiply-adds an instruction) cores that run a 512-bit FMA as two 256-bit halves, or have one 512-bit FMA
// unit, issue as many multiply-adds as on 512-bit ones; cores with two full-width units, half as many.
template <typename V>
double F32Loop(float* sink) {
#define COLBERT_JAX_FDECL(i) V f##i = Splat(i * 0.001f, V{});
  COLBERT_JAX_CHAINS(COLBERT_JAX_FDECL)
  V b = Splat(0.999f, V{}), c = Splat(0.0001f, V{});
  const auto t0 = Clock::now();
  for (long i = 0; i < kSteps; ++i) {
#define COLBERT_JAX_FSTEP(i) f##i = Fma(f##i, b, c);
    COLBERT_JAX_CHAINS(COLBERT_JAX_FSTEP)
    __asm__ volatile("" : "+v"(b));  // b opaque: the loop is not folded
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
#define COLBERT_JAX_FSUM(i) *sink += FirstLane(f##i);
  COLBERT_JAX_CHAINS(COLBERT_JAX_FSUM)
  return seconds;
}

// (macs per instruction / other's seconds) / (16 / float32's seconds), the fastest turn of each.
template <class Loop>
double OverF32(double macs, Loop other) {
  double f32 = 1e30, low = 1e30;
  float sink = 0.0f;
  for (int turn = 0; turn < kTurns; ++turn) {
    f32 = std::min(f32, F32Loop<__m512>(&sink));
    low = std::min(low, other(&sink));
  }
  volatile float keep = sink;
  (void)keep;
  return (macs / low) / (16.0 / f32);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
using colbert_jax_native::Dpbusd;
using colbert_jax_native::Dpwssd;
using colbert_jax_native::I32x16;

// int8 quads into int32 lanes (`vpdpbusd`), the sums as I32x16 (vnni.h: as __m512i, GCC spills some of them).
double Int8Loop(float* sink) {
#define COLBERT_JAX_IDECL(i) I32x16 v##i = (I32x16)_mm512_set1_epi32(i);
  COLBERT_JAX_CHAINS(COLBERT_JAX_IDECL)
  __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5);
  const auto t0 = Clock::now();
  for (long i = 0; i < kSteps; ++i) {
#define COLBERT_JAX_ISTEP(i) v##i = Dpbusd(v##i, x, y);
    COLBERT_JAX_CHAINS(COLBERT_JAX_ISTEP)
    __asm__ volatile("" : "+v"(x));
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
#define COLBERT_JAX_ISUM(i) *sink += static_cast<float>(_mm512_reduce_add_epi32((__m512i)v##i));
  COLBERT_JAX_CHAINS(COLBERT_JAX_ISUM)
  return seconds;
}

// int16 pairs into int32 lanes (`vpdpwssd`, 32 multiply-adds an instruction).
double Int16Loop(float* sink) {
  COLBERT_JAX_CHAINS(COLBERT_JAX_IDECL)
  __m512i x = _mm512_set1_epi16(3), y = _mm512_set1_epi16(5);
  const auto t0 = Clock::now();
  for (long i = 0; i < kSteps; ++i) {
#define COLBERT_JAX_WSTEP(i) v##i = Dpwssd(v##i, x, y);
    COLBERT_JAX_CHAINS(COLBERT_JAX_WSTEP)
    __asm__ volatile("" : "+v"(x));
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  COLBERT_JAX_CHAINS(COLBERT_JAX_ISUM)
  return seconds;
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define COLBERT_JAX_RATES_BF16 1
double Bf16Loop(float* sink) {
#define COLBERT_JAX_BDECL(i) __m512 h##i = _mm512_set1_ps(i * 0.001f);
  COLBERT_JAX_CHAINS(COLBERT_JAX_BDECL)
  __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.001f), _mm512_set1_ps(0.002f));
  const auto t0 = Clock::now();
  for (long i = 0; i < kSteps; ++i) {
#define COLBERT_JAX_BSTEP(i) h##i = _mm512_dpbf16_ps(h##i, a, b);
    COLBERT_JAX_CHAINS(COLBERT_JAX_BSTEP)
    __asm__ volatile("" : "+v"(a));
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
#define COLBERT_JAX_BSUM(i) *sink += _mm512_reduce_add_ps(h##i);
  COLBERT_JAX_CHAINS(COLBERT_JAX_BSUM)
  return seconds;
}
#endif

}  // namespace

// 256-bit float32 multiply-adds over 512-bit ones: 1 where 512-bit FMAs run at half width (AMD Zen 4) or on one
// unit, 0.5 where on two full-width units (AMD Zen 5; Intel Xeons with two FMA units). 0.0 without AVX-512.
extern "C" double colbert_jax_f32_256_over_f32_rate() {
#if defined(__AVX512F__)
  return OverF32(8.0, F32Loop<__m256>);
#else
  return 0.0;
#endif
}

// 0.0 where the library is not built with AVX-512 VNNI (callers check `colbert_jax_int8_vnni` first).
extern "C" double colbert_jax_int8_over_f32_rate() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return OverF32(64.0, Int8Loop);
#else
  return 0.0;
#endif
}

// 0.0 where the library is not built with AVX-512 VNNI.
extern "C" double colbert_jax_int16_over_f32_rate() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return OverF32(32.0, Int16Loop);
#else
  return 0.0;
#endif
}

// 0.0 where the library is not built with AVX-512 BF16 or this CPU does not run it.
extern "C" double colbert_jax_bf16_over_f32_rate() {
#if defined(COLBERT_JAX_RATES_BF16)
  if (!colbert_jax_native::CpuRunsAvx512Bf16()) return 0.0;
  return OverF32(32.0, Bf16Loop);
#else
  return 0.0;
#endif
}
