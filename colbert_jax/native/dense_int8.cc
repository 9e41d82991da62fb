// The int8 query encoder's dense layer on the CPU (`colbert_jax.modeling.quantize`), called from XLA programs
// through the XLA FFI: one kernel for what XLA:CPU runs as a dozen ops (the activation split, two int8
// products, their float epilogue).
//
// For each row x [K] of the input (one token's features):
//   s = max|x| * (1 / 127) (1 where that is 0); steps = x * (1 / s);
//   hi = clip(round_half_even(steps), -127, 127); lo = clip(round_half_even((steps - hi) * 254), -127, 127);
//   main[n] = hi . w_hi[:, n];  cross[n] = hi . w_lo[:, n] + lo . w_hi[:, n]   (exact, int32);
//   out[n] = fma(float(cross), 1 / 254, float(main)) / ((1 / s) * (1 / w_scale[n])).
// Each float operation is the one XLA:CPU compiles `quantize._int8_matmul` into (it turns the divisions by 127
// and by s into products with reciprocals, and the epilogue's product and sum into an FMA), in the same
// order, so the output matches the XLA path bit for bit; and each row's result depends on that row
// alone, whatever the batch (the int8 query encoder's batch invariance).
//
// Weights arrive pre-packed (`colbert_jax.native.pack_dense`): w_hi and w_lo each as [Nb, Kp / 4, 16, 4] int8,
// Nb = ceil(N / 32) * 2 blocks of 16 output columns, Kp = ceil(K / 64) * 64 (zero padding), four consecutive
// k of one column adjacent: the layout of an AMX B tile, so one tile load reads 1 KiB contiguously.
// w_scale is [Nb * 16] (padding 1). On CPUs with AMX-INT8 the products run on the tile unit (16 x 16 int32
// blocks, 64 k per instruction); on AVX-512 VNNI builds they can run on the vector unit (`vpdpbusd`: 16
// columns x 4 k per instruction; the same 64-byte rows of the layout); elsewhere a portable loop computes the
// same integers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"
#include "blocking.h"
#include "gelu.h"
#include "tasks.h"
#include "vnni.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::FlushDenormals;
using colbert_jax_native::GeluInPlace;
using colbert_jax_native::GeluVectorReady;
using colbert_jax_native::RunTasks;
using colbert_jax_native::TaskGrid;

constexpr float kLowSteps = 254.0f;  // quantize._LOW_STEPS
constexpr int64_t kRowBlock = 16;
constexpr int64_t kRowsPerGroup = 64;     // rows one task runs against a chunk of columns (B reused from cache)
constexpr int64_t kMacsPerThread = 1 << 22;  // below this much work per thread, fewer threads

// The split of one row (scalar: the reference the vector version must equal).
void QuantizeRowScalar(const float* x, int64_t k, int64_t kp, int8_t* hi, int8_t* lo, float* scale) {
  float m = 0.0f;
  for (int64_t i = 0; i < k; ++i) m = std::max(m, std::fabs(x[i]));
  float s = m * (1.0f / 127.0f);
  if (!(s > 0.0f)) s = 1.0f;
  *scale = s;
  const float inv = 1.0f / s;
  for (int64_t i = 0; i < k; ++i) {
    const float steps = x[i] * inv;
    const float h = std::min(127.0f, std::max(-127.0f, std::nearbyint(steps)));
    const float l = std::min(127.0f, std::max(-127.0f, std::nearbyint((steps - h) * kLowSteps)));
    hi[i] = static_cast<int8_t>(h);
    lo[i] = static_cast<int8_t>(l);
  }
  std::memset(hi + k, 0, kp - k);
  std::memset(lo + k, 0, kp - k);
}

// XLA:CPU contracts the epilogue's product and sum into one fused multiply-add: so does this kernel, explicitly
// (whatever the compiler's contraction setting).
inline float Epilogue(int32_t main, int32_t cross, float inv_x, float inv_w) {
  const float acc = std::fma(static_cast<float>(cross), 1.0f / kLowSteps, static_cast<float>(main));
  return acc / (inv_x * inv_w);
}

// Rows [r0, r1) x column blocks [b0, b1) with plain loops over the packed weights.
void ProductsPortable(const int8_t* ahi, const int8_t* alo, const float* xs, int64_t r0, int64_t r1, int64_t kp,
                      const int8_t* whi, const int8_t* wlo, const float* inv_w, int64_t b0, int64_t b1, int64_t n,
                      float* out) {
  const int64_t block_bytes = kp * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* h = ahi + r * kp;
    const int8_t* l = alo + r * kp;
    const float inv_x = 1.0f / xs[r];
    for (int64_t b = b0; b < b1; ++b) {
      int32_t main[16] = {0}, cross[16] = {0};
      const int8_t* bh = whi + b * block_bytes;
      const int8_t* bl = wlo + b * block_bytes;
      for (int64_t q = 0; q < kp / 4; ++q) {
        for (int j = 0; j < 16; ++j) {
          for (int t = 0; t < 4; ++t) {
            const int32_t xh = h[q * 4 + t], xl = l[q * 4 + t];
            const int32_t wh = bh[(q * 16 + j) * 4 + t], wl = bl[(q * 16 + j) * 4 + t];
            main[j] += xh * wh;
            cross[j] += xh * wl + xl * wh;
          }
        }
      }
      for (int j = 0; j < 16 && b * 16 + j < n; ++j) {
        out[r * n + b * 16 + j] = Epilogue(main[j], cross[j], inv_x, inv_w[b * 16 + j]);
      }
    }
  }
}

#if COLBERT_JAX_HAS_AMX || (defined(__AVX512VNNI__) && defined(__AVX512BW__))
// QuantizeRowScalar's operations on 16 lanes (the same bits), shared by the AMX and VNNI paths' row splits,
// which differ only in where they store the terms. Target attributes: the AMX path is built by attribute on any
// x86-64 build, so these must carry AVX-512 themselves (and be inlined into it).
#define COLBERT_JAX_SPLIT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))

// The row's scale: its largest magnitude / 127 (1 for a row of zeros).
COLBERT_JAX_SPLIT_TARGET inline float RowScaleAvx512(const float* x, int64_t k) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 keep = k - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (k - i)) - 1);
    m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(keep, x + i)));
  }
  const float s = _mm512_reduce_max_ps(m) * (1.0f / 127.0f);
  return s > 0.0f ? s : 1.0f;
}

// Lanes i..i+15 of the row's split, as int32: the high term and the low one (padding lanes load 0, give 0).
COLBERT_JAX_SPLIT_TARGET inline void SplitLanesAvx512(const float* x, int64_t k, int64_t i, __m512 inv,
                                                      __m512i* hi32, __m512i* lo32) {
  const __m512 top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f), steps_lo = _mm512_set1_ps(kLowSteps);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __mmask16 keep = k - i >= 16 ? 0xffff : k > i ? static_cast<__mmask16>((1u << (k - i)) - 1) : 0;
  const __m512 steps = _mm512_mul_ps(_mm512_maskz_loadu_ps(keep, x + i), inv);
  const __m512 h = _mm512_min_ps(top, _mm512_max_ps(bottom, _mm512_roundscale_ps(steps, kRound)));
  const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(steps, h), steps_lo);
  const __m512 l = _mm512_min_ps(top, _mm512_max_ps(bottom, _mm512_roundscale_ps(rest, kRound)));
  *hi32 = _mm512_cvtps_epi32(h);
  *lo32 = _mm512_cvtps_epi32(l);
}
#endif

#if COLBERT_JAX_HAS_AMX
#define COLBERT_JAX_AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl")))


// One finished 32 x 16 block of main and cross products (tile stores), waiting for its float epilogue.
struct PendingBlock {
  const int32_t* c = nullptr;  // main, cross of rows 0-15, then of rows 16-31: 16 x 16 int32 each
  int64_t row = 0, col = 0, rows = 0, done = 0;
  __m512 inv_w;
  __mmask16 keep;
};

// The epilogue of the pending block's rows [done, upto) (as Epilogue, 16 columns at a time).
COLBERT_JAX_AMX_TARGET inline void FinishRows(PendingBlock& p, int64_t upto, const float* xs, int64_t n,
                                              float* out) {
  const __m512 inv_steps = _mm512_set1_ps(1.0f / kLowSteps);
  const int64_t stop = std::min(upto, p.rows);
  for (int64_t i = p.done; i < stop; ++i) {
    const int64_t half = i < kRowBlock ? 0 : 1, row = i - half * kRowBlock;
    const __m512 main = _mm512_cvtepi32_ps(_mm512_load_si512(p.c + (2 * half) * 256 + row * 16));
    const __m512 cross = _mm512_cvtepi32_ps(_mm512_load_si512(p.c + (2 * half + 1) * 256 + row * 16));
    const __m512 acc = _mm512_fmadd_ps(cross, inv_steps, main);
    const __m512 den = _mm512_mul_ps(_mm512_set1_ps(1.0f / xs[p.row + i]), p.inv_w);
    _mm512_mask_storeu_ps(out + (p.row + i) * n + p.col, p.keep, _mm512_div_ps(acc, den));
  }
  p.done = std::max(p.done, stop);
}

// Rows [r0, r1) (whole pairs of 16-row blocks of the tiled activation buffers, see QuantizeRowAvx512) x column
// blocks [b0, b1). Tiles: 0-3 accumulate main and cross for two row blocks of one column block, 4-5 hold a
// row block's hi and lo bytes for 64 k (loaded for one row block, then the other), 6-7 the column block's
// weights: each weight tile is used for 32 rows. The float epilogue of each block runs interleaved with the
// next block's products (the tile unit works while the vector unit divides) rather than between them.
COLBERT_JAX_AMX_TARGET void ProductsAmx(const int8_t* ahi, const int8_t* alo, const float* xs, int64_t r0,
                                        int64_t r1, int64_t m, int64_t kp, const int8_t* whi, const int8_t* wlo,
                                        const float* inv_w, int64_t b0, int64_t b1, int64_t n, float* out) {
  colbert_jax_native::ConfigureTiles();
  alignas(64) int32_t c[2][4 * 16 * 16];  // this block's products, and the pending block's
  int which = 0;
  PendingBlock pending;
  const int64_t block_bytes = kp * 16, steps = kp / 64;
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* bh = whi + b * block_bytes;
    const int8_t* bl = wlo + b * block_bytes;
    const int64_t col = b * 16;
    if (col >= n) break;
    for (int64_t r = r0; r < r1; r += 2 * kRowBlock) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const int8_t* h0 = ahi + r * kp;  // row block r / 16: its (kp / 64) tiles of 16 x 64 bytes, one after another
      const int8_t* l0 = alo + r * kp;
      const int8_t* h1 = h0 + kRowBlock * kp;
      const int8_t* l1 = l0 + kRowBlock * kp;
      const int64_t per_step = (pending.rows + steps - 1) / steps;
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t at = s * 1024;
        _tile_loadd(6, bh + at, 64);
        _tile_loadd(7, bl + at, 64);
        _tile_loadd(4, h0 + at, 64);
        _tile_loadd(5, l0 + at, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(1, 5, 6);
        _tile_loadd(4, h1 + at, 64);
        _tile_loadd(5, l1 + at, 64);
        _tile_dpbssd(2, 4, 6);
        _tile_dpbssd(3, 4, 7);
        _tile_dpbssd(3, 5, 6);
        if (pending.c != nullptr) FinishRows(pending, (s + 1) * per_step, xs, n, out);
      }
      if (pending.c != nullptr) FinishRows(pending, pending.rows, xs, n, out);
      int32_t* done = c[which];
      which ^= 1;
      _tile_stored(0, done, 64);
      _tile_stored(1, done + 256, 64);
      _tile_stored(2, done + 512, 64);
      _tile_stored(3, done + 768, 64);
      pending.c = done;
      pending.row = r;
      pending.col = col;
      pending.rows = std::min<int64_t>(2 * kRowBlock, m - r);
      pending.done = 0;
      pending.inv_w = _mm512_loadu_ps(inv_w + col);
      pending.keep = n - col >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - col)) - 1);
    }
  }
  if (pending.c != nullptr) FinishRows(pending, pending.rows, xs, n, out);
  _tile_release();
}

// The vector twin of QuantizeRowScalar (the same operations on 16 lanes), writing the row into the tiled
// layout the tile loads read contiguously: row r's bytes k..k+63 at ((r / 16) * (kp / 64) + k / 64) * 1024 +
// (r % 16) * 64; hi and lo point at the row's first chunk, ((r / 16) * (kp / 64)) * 1024 + (r % 16) * 64.
COLBERT_JAX_AMX_TARGET void QuantizeRowAvx512(const float* x, int64_t k, int64_t kp, int8_t* hi, int8_t* lo,
                                              float* scale) {
  *scale = RowScaleAvx512(x, k);
  const __m512 inv = _mm512_set1_ps(1.0f / *scale);
  for (int64_t i = 0; i < kp; i += 16) {
    __m512i h, l;
    SplitLanesAvx512(x, k, i, inv, &h, &l);
    const int64_t at = (i / 64) * 1024 + i % 64;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + at), _mm512_cvtepi32_epi8(h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + at), _mm512_cvtepi32_epi8(l));
  }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define COLBERT_JAX_HAS_VNNI 1
constexpr int64_t kVnniRows = 4;  // rows per register block: 4 x 2 column blocks x (main, cross) accumulators

// The split of one row on 16 lanes (QuantizeRowScalar's operations, the same bits), into a row-major buffer,
// with the row's sums of hi and of lo (the VNNI products' offset correction, below).
void QuantizeRowVnni(const float* x, int64_t k, int64_t kp, int8_t* hi, int8_t* lo, float* scale, int32_t* sums) {
  *scale = RowScaleAvx512(x, k);
  const __m512 inv = _mm512_set1_ps(1.0f / *scale);
  __m512i sum_hi = _mm512_setzero_si512(), sum_lo = _mm512_setzero_si512();
  for (int64_t i = 0; i < kp; i += 16) {
    __m512i h, l;
    SplitLanesAvx512(x, k, i, inv, &h, &l);
    sum_hi = _mm512_add_epi32(sum_hi, h);
    sum_lo = _mm512_add_epi32(sum_lo, l);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + i), _mm512_cvtepi32_epi8(h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + i), _mm512_cvtepi32_epi8(l));
  }
  sums[0] = _mm512_reduce_add_epi32(sum_hi);
  sums[1] = _mm512_reduce_add_epi32(sum_lo);
}

// R rows from row r x column blocks b, b + 1 (C = 2) or b alone (C = 1), over all of kp. vpdpbusd multiplies
// unsigned by signed bytes: the weights go in as unsigned (w xor 0x80 = w + 128), the activations as signed
// (one row's 4 bytes broadcast to the 16 columns), and 128 * (the row's sum) comes off afterwards, so every
// integer is the exact signed product's (no sum can reach 2^31: 2 * kp * 255 * 127 for kp < 33,000).
template <int R, int C>
inline void BlockVnni(const int8_t* ahi, const int8_t* alo, const float* xs, const int32_t* sums, int64_t r,
                      int64_t kp, const int8_t* whi, const int8_t* wlo, const float* inv_w, int64_t b, int64_t n,
                      float* out) {
  using colbert_jax_native::Dpbusd;
  colbert_jax_native::I32x16 main[R][C], cross[R][C];
  for (int j = 0; j < R; ++j) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) main[j][c] = cross[j][c] = colbert_jax_native::ZeroI32x16();
  }
  const int64_t block_bytes = kp * 16;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* bh = whi + b * block_bytes;
  const int8_t* bl = wlo + b * block_bytes;
  const int8_t* h = ahi + r * kp;
  const int8_t* l = alo + r * kp;
  for (int64_t q = 0; q < kp / 4; ++q) {
    __m512i wh[C], wl[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      wh[c] = _mm512_xor_si512(_mm512_loadu_si512(bh + c * block_bytes + q * 64), flip);
      wl[c] = _mm512_xor_si512(_mm512_loadu_si512(bl + c * block_bytes + q * 64), flip);
    }
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      int32_t h4, l4;
      std::memcpy(&h4, h + j * kp + q * 4, 4);
      std::memcpy(&l4, l + j * kp + q * 4, 4);
      const __m512i xh = _mm512_set1_epi32(h4), xl = _mm512_set1_epi32(l4);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        main[j][c] = Dpbusd(main[j][c], wh[c], xh);
        cross[j][c] = Dpbusd(cross[j][c], wl[c], xh);
        cross[j][c] = Dpbusd(cross[j][c], wh[c], xl);
      }
    }
  }
  const __m512 inv_steps = _mm512_set1_ps(1.0f / kLowSteps);
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) {
    const int64_t col = (b + c) * 16;
    if (col >= n) continue;
    const __m512 inv_wc = _mm512_loadu_ps(inv_w + col);
    const __mmask16 keep = n - col >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - col)) - 1);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const int32_t sh = sums[2 * (r + j)], sl = sums[2 * (r + j) + 1];
      const __m512i m32 = _mm512_sub_epi32((__m512i)main[j][c], _mm512_set1_epi32(128 * sh));
      const __m512i c32 = _mm512_sub_epi32((__m512i)cross[j][c], _mm512_set1_epi32(128 * (sh + sl)));
      const __m512 acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c32), inv_steps, _mm512_cvtepi32_ps(m32));
      const __m512 den = _mm512_mul_ps(_mm512_set1_ps(1.0f / xs[r + j]), inv_wc);
      _mm512_mask_storeu_ps(out + (r + j) * n + col, keep, _mm512_div_ps(acc, den));
    }
  }
}

template <int C>
void RowsVnni(const int8_t* ahi, const int8_t* alo, const float* xs, const int32_t* sums, int64_t r0, int64_t r1,
              int64_t kp, const int8_t* whi, const int8_t* wlo, const float* inv_w, int64_t b, int64_t n,
              float* out) {
  int64_t r = r0;
  for (; r + kVnniRows <= r1; r += kVnniRows) BlockVnni<kVnniRows, C>(ahi, alo, xs, sums, r, kp, whi, wlo, inv_w, b, n, out);
  switch (r1 - r) {
    case 3: BlockVnni<3, C>(ahi, alo, xs, sums, r, kp, whi, wlo, inv_w, b, n, out); break;
    case 2: BlockVnni<2, C>(ahi, alo, xs, sums, r, kp, whi, wlo, inv_w, b, n, out); break;
    case 1: BlockVnni<1, C>(ahi, alo, xs, sums, r, kp, whi, wlo, inv_w, b, n, out); break;
    default: break;
  }
}

// Rows [r0, r1) (real rows only) x column blocks [b0, b1), two blocks at a time.
void ProductsVnni(const int8_t* ahi, const int8_t* alo, const float* xs, const int32_t* sums, int64_t r0,
                  int64_t r1, int64_t kp, const int8_t* whi, const int8_t* wlo, const float* inv_w, int64_t b0,
                  int64_t b1, int64_t n, float* out) {
  int64_t b = b0;
  for (; b + 2 <= b1; b += 2) RowsVnni<2>(ahi, alo, xs, sums, r0, r1, kp, whi, wlo, inv_w, b, n, out);
  if (b < b1) RowsVnni<1>(ahi, alo, xs, sums, r0, r1, kp, whi, wlo, inv_w, b, n, out);
}
#endif

bool VnniBuilt() {
#if defined(COLBERT_JAX_HAS_VNNI)
  return true;
#else
  return false;
#endif
}

bool AmxReady() {
  static const bool ready = colbert_jax_native::AmxReady(colbert_jax_native::AmxProducts::kInt8);
  return ready;
}

// The product, and with `gelu_bias` (bias [N]) gelu(product + bias) by gelu.h in each task's epilogue, on its
// [rows, columns] block of out while in cache (the same bits as the GELU kernel on the product).
ffi::Error Product(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S8>& w_hi,
                   ffi::Buffer<ffi::S8>& w_lo, ffi::Buffer<ffi::F32>& w_scale, const float* gelu_bias,
                   ffi::ResultBuffer<ffi::F32>& out, int32_t implementation) {
  auto x_dims = x.dimensions();
  auto w_dims = w_hi.dimensions();
  auto o_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || o_dims.size() != 2 || w_dims[2] != 64) {
    return ffi::Error::InvalidArgument("int8_dense: x needs [M, K], packed weights [Nb, Kp / 4, 64], out [M, N]");
  }
  const int64_t m = x_dims[0], k = x_dims[1], n = o_dims[1];
  const int64_t blocks = w_dims[0], kp = w_dims[1] * 4;
  if (o_dims[0] != m || kp % 64 || kp < k || kp >= k + 64 || blocks % 2 || blocks * 16 < n ||
      blocks * 16 >= n + 32 || w_lo.element_count() != w_hi.element_count() || w_scale.element_count() != blocks * 16) {
    return ffi::Error::InvalidArgument("int8_dense: the packed weights do not fit x [M, K] and out [M, N]");
  }
  // implementation: 0 portable, 1 AMX, 2 AVX-512 VNNI (`native.DENSE_IMPLEMENTATIONS`' order)
  if (implementation < 0 || implementation > 2) return ffi::Error::InvalidArgument("int8_dense: bad implementation");
  const bool use_amx = implementation == 1, use_vnni = implementation == 2;
  if (use_amx && !AmxReady()) return ffi::Error::InvalidArgument("int8_dense: this CPU or OS has no AMX-INT8");
  if (use_vnni && !VnniBuilt()) return ffi::Error::InvalidArgument("int8_dense: not built with AVX-512 VNNI");
  if (m == 0) return ffi::Error::Success();
  const bool gelu_vector = GeluVectorReady();

  const int64_t m_pad = (m + 2 * kRowBlock - 1) / (2 * kRowBlock) * (2 * kRowBlock);  // pairs of row blocks
  // Uninitialised: every real row is written below; the padding rows' products are computed and discarded.
  colbert_jax_native::TileBuffer<int8_t> ahi(m_pad * kp), alo(m_pad * kp);
  std::vector<float> xs(m_pad, 1.0f), inv_w(blocks * 16);
  std::vector<int32_t> sums(use_vnni ? 2 * m_pad : 0);
  const float* ws = w_scale.typed_data();
  for (int64_t i = 0; i < blocks * 16; ++i) inv_w[i] = 1.0f / ws[i];
  const float* xd = x.typed_data();

  // 1. the activation split, a block of rows per task
  const int64_t row_blocks = m_pad / kRowBlock;
  const int64_t macs = m * kp * blocks * 16 * 3;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  RunTasks(pool, row_blocks, macs / kMacsPerThread, 1, [&](int64_t t) {
    for (int64_t r = t * kRowBlock; r < std::min<int64_t>((t + 1) * kRowBlock, m); ++r) {
#if defined(COLBERT_JAX_HAS_VNNI)
      if (use_vnni) {
        QuantizeRowVnni(xd + r * k, k, kp, ahi.data() + r * kp, alo.data() + r * kp, xs.data() + r, sums.data() + 2 * r);
        continue;
      }
#endif
#if COLBERT_JAX_HAS_AMX
      if (use_amx) {
        const int64_t at = (r / kRowBlock) * kRowBlock * kp + (r % kRowBlock) * 64;
        QuantizeRowAvx512(xd + r * k, k, kp, ahi.data() + at, alo.data() + at, xs.data() + r);
        continue;
      }
#endif
      QuantizeRowScalar(xd + r * k, k, kp, ahi.data() + r * kp, alo.data() + r * kp, xs.data() + r);
    }
  });

  // 2. the products: groups of rows x chunks of column-block pairs, enough tasks for every thread
  const TaskGrid grid(m_pad, blocks / 2, threads, kRowsPerGroup);
  float* o = out->typed_data();
  RunTasks(pool, grid.tasks(), macs / kMacsPerThread, 1, [&](int64_t t) {
    const int64_t r0 = grid.first_row(t), r1 = std::min<int64_t>(r0 + kRowsPerGroup, m_pad);
    const int64_t b0 = 2 * grid.first_unit(t), b1 = 2 * grid.end_unit(t);
    if (b0 >= b1) return;
    [&] {
#if COLBERT_JAX_HAS_AMX
      if (use_amx) {
        return ProductsAmx(ahi.data(), alo.data(), xs.data(), r0, r1, m, kp, w_hi.typed_data(), w_lo.typed_data(),
                           inv_w.data(), b0, b1, n, o);
      }
#endif
#if defined(COLBERT_JAX_HAS_VNNI)
      if (use_vnni) {
        return ProductsVnni(ahi.data(), alo.data(), xs.data(), sums.data(), r0, std::min(r1, m), kp,
                            w_hi.typed_data(), w_lo.typed_data(), inv_w.data(), b0, b1, n, o);
      }
#endif
      ProductsPortable(ahi.data(), alo.data(), xs.data(), r0, std::min(r1, m), kp, w_hi.typed_data(),
                       w_lo.typed_data(), inv_w.data(), b0, b1, n, o);
    }();
    if (gelu_bias != nullptr && r0 < m) {
      const int64_t c0 = b0 * 16, c1 = std::min(b1 * 16, n);
      const FlushDenormals flush;
      GeluInPlace(o + r0 * n + c0, n, gelu_bias + c0, std::min(r1, m) - r0, c1 - c0, gelu_vector);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Int8Dense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w_hi,
                     ffi::Buffer<ffi::S8> w_lo, ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> out,
                     int32_t implementation) {
  return Product(pool, x, w_hi, w_lo, w_scale, nullptr, out, implementation);
}

ffi::Error Int8DenseGelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w_hi,
                         ffi::Buffer<ffi::S8> w_lo, ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::F32> bias,
                         ffi::ResultBuffer<ffi::F32> out, int32_t implementation) {
  if (out->dimensions().size() != 2 || static_cast<int64_t>(bias.element_count()) != out->dimensions()[1]) {
    return ffi::Error::InvalidArgument("int8_dense: the GELU's bias needs [N], N out's columns");
  }
  return Product(pool, x, w_hi, w_lo, w_scale, bias.typed_data(), out, implementation);
}

}  // namespace

extern "C" int colbert_jax_amx_ready() { return AmxReady() ? 1 : 0; }
extern "C" int colbert_jax_int8_vnni() { return VnniBuilt() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxInt8DenseGelu, Int8DenseGelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("implementation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxInt8Dense, Int8Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("implementation"));
