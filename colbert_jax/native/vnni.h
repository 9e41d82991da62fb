// The int32 dot products of AVX-512 VNNI with their sums kept as 16 x int32 (`__v16si`), the type of the
// instructions' builtins. With `__m512i` sums (8 x int64) GCC 12 converts each sum's type at every product
// and, in a fully unrolled register block, then keeps two copies of the block, moving one into the other
// every step and spilling what does not fit: the same loop with `__v16si` sums compiles to the products alone.
#pragma once

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512VNNI__)

#include <immintrin.h>

namespace colbert_jax_native {

using I32x16 = __v16si;

inline I32x16 ZeroI32x16() { return (I32x16)_mm512_setzero_si512(); }

// acc + the sums of 4 products of u8's unsigned bytes and s8's signed bytes, lane by lane (`vpdpbusd`).
inline I32x16 Dpbusd(I32x16 acc, __m512i u8, __m512i s8) {
  return (I32x16)_mm512_dpbusd_epi32((__m512i)acc, u8, s8);
}

// acc + the sums of 2 products of a's and b's signed 16-bit integers, lane by lane (`vpdpwssd`).
inline I32x16 Dpwssd(I32x16 acc, __m512i a, __m512i b) {
  return (I32x16)_mm512_dpwssd_epi32((__m512i)acc, a, b);
}

}  // namespace colbert_jax_native

#endif
