// bfloat16 conversions shared by the kernels that round float32 operands (amx.h's tile operands,
// centroid_scores_bf16.cc, dense_bf16.cc): the same rounding as ml_dtypes' cast, so a kernel's operands are the
// bits `x.astype(jnp.bfloat16)` gives.
#pragma once

#include <cstdint>
#include <cstring>

namespace colbert_jax_native {

// float -> bfloat16 bits, round to nearest even; a NaN stays a (quiet) NaN rather than rounding into infinity.
inline uint16_t ToBf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Whether this CPU and OS run AVX-512 BF16 with the BW and VL extensions its kernels use (__builtin_cpu_supports
// also checks that the OS saves the AVX-512 state).
inline bool CpuRunsAvx512Bf16() {
#if defined(__x86_64__)
  static const bool ready = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return ready;
#else
  return false;
#endif
}

inline float FromBf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace colbert_jax_native
