// What the AMX kernels share (dense_int8.cc, centroid_scores.cc, plaid_cpu.cc): whether this CPU and OS run the tile unit, and
// the tile configuration they all use (8 tiles of 16 rows x 64 bytes).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "bf16.h"

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 11)
#define COLBERT_JAX_HAS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace colbert_jax_native {

enum class AmxProducts { kInt8, kBf16 };

// Q [lq, dim] float32 -> its bfloat16 terms hi = bf16(x), lo = bf16(x - hi) in the layout of AMX B tiles for
// bfloat16 products: [kp / 32][nb][16 pairs of k][16 tokens][2] (kp: dim rounded up to 32, nb: lq's blocks of
// 16 tokens; zeros past dim and lq). With split A operands, hi.hi + hi.lo + lo.hi is a float32-class product.
inline void SplitForTiles(const float* q, int64_t lq, int64_t dim, int64_t kp, int64_t nb, uint16_t* hi,
                          uint16_t* lo) {
  const int64_t size = kp * nb * 16;
  std::fill(hi, hi + size, 0);
  std::fill(lo, lo + size, 0);
  for (int64_t t = 0; t < lq; ++t) {
    for (int64_t k = 0; k < dim; ++k) {
      const float x = q[t * dim + k];
      const uint16_t h = ToBf16(x);
      const int64_t at = (((k / 32) * nb + t / 16) * 16 + (k % 32) / 2) * 32 + (t % 16) * 2 + k % 2;
      hi[at] = h;
      lo[at] = ToBf16(x - FromBf16(h));
    }
  }
}


// Allocates on 64-byte boundaries. A tile row is 64 bytes: from a buffer off that boundary (malloc's 16) every
// row of a tile load straddles two cache lines, and the kernels ran at about half speed. `TileBuffer<T>(n)`
// leaves its elements uninitialised (buffers the kernel overwrites; `TileBuffer<T>(n, 0)` zeroes).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;  // default-initialised: no zero fill of a buffer about to be overwritten
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

// The buffers the kernels load tiles from.
template <typename T>
using TileBuffer = std::vector<T, CacheLineAllocator<T>>;

// Whether the CPU has tiles with `products` (and the AVX-512 the kernels' epilogues use) and Linux grants this
// process the tile state. Each kernel asks once and keeps the answer.
inline bool AmxReady(AmxProducts products) {
#if COLBERT_JAX_HAS_AMX
  unsigned int a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1, bf16 = (d >> 22) & 1;
  const bool avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1;
  const bool has = products == AmxProducts::kInt8 ? int8 && avx512bw : bf16;
  if (!tile || !avx512f || !has) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // Linux: ask for the tile state
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

#if COLBERT_JAX_HAS_AMX
// Loads the configuration: palette 1, tiles 0-7 each 16 rows of 64 bytes.
__attribute__((target("amx-tile"))) inline void ConfigureTiles() {
  struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}
#endif

}  // namespace colbert_jax_native
