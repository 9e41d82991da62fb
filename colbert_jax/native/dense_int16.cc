// A dense layer on int16 operands with exact integer sums (`colbert_jax.native.dense_int16`), called from XLA
// programs through the XLA FFI, for the query encoder's dense layers on CPUs with AVX-512 VNNI (`vpdpwssd`: two
// int16 products a lane an instruction, the rate of `vdpbf16ps` where a CPU has both, and 1.5x the rate of the
// two-term int8 encoder's three int8 products on CPUs without AVX-512 BF16).
//
// out [M, N] = sx [M] * sw [N] * (X [M, K] . W [K, N]), with X and W int16 codes of at most kMaxCode in
// magnitude: each row of x quantized here with its own scale (m = max |x_k|, code rint(x_k * (kMaxCode / m)),
// scale m * (1 / kMaxCode); codes and scale 0 for m = 0), each column of the weights at packing time
// (`colbert_jax.native.pack_dense_int16`: panels of 48 columns, [N / 48][K2][48][2] int16, a column's
// coordinate pair (2kk, 2kk + 1) adjacent, zeros past K and N; scales [N]).
//
// The sums run in int32 over passes of kDepth pairs, exact: a pass adds at most 2 * kDepth * kMaxCode^2 < 2^31
// in magnitude. Each pass's sum is converted to float32 and added to the running sum of the passes before it
// (pass 0 alone, then + pass 1, ...), and the result is multiplied by the row's scale, then by the column's:
// the bits of `colbert_jax.native.dense_int16_reference`, XLA's twin. A row's result depends on that row of x
// alone: the same bits at every batch size. x must be finite.
//
// As dense_bf16.cc: register blocks of 8 rows x 48 columns (per pair 3 vector loads, 8 broadcasts and 24
// vpdpwssd), tasks over groups of rows x chunks of panels, the exact GELU (gelu.h, XLA's bits) in the epilogue of
// BERT's intermediate product, and the fused query/key/value product computing the keys and values of the
// wanted rows only.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "blocking.h"
#include "gelu.h"
#include "tasks.h"
#include "vnni.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::FlushDenormals;
using colbert_jax_native::ForRowBlocks;
using colbert_jax_native::GatherRows;
using colbert_jax_native::GeluInPlace;
using colbert_jax_native::GeluVectorReady;
using colbert_jax_native::LineShares;
using colbert_jax_native::RunTasks;
using colbert_jax_native::SpreadRows;
using colbert_jax_native::TaskGrid;

constexpr int64_t kPanel = 48;                // columns per packed panel
constexpr int64_t kRows = 8;                  // rows per register block
constexpr int64_t kRowsPerTask = 256;         // rows one task runs against its panels
constexpr int64_t kDepth = 64;                // pairs per pass (128 coordinates): 12 KiB of the panel in L1
constexpr int32_t kMaxCode = 4095;            // |code| <= kMaxCode on both sides
constexpr int64_t kFlopsPerThread = 1 << 21;  // below this much work per thread, fewer threads
static_assert(2 * kDepth * int64_t{kMaxCode} * kMaxCode < (int64_t{1} << 31), "a pass's int32 sum cannot overflow");

#if defined(__x86_64__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define COLBERT_JAX_DENSE_INT16 1
#endif

// Row r of x float32 [M, K] -> int16 codes [K2 * 2] (pairs as uint32 words, zero past K) and its scale.
float QuantizeRow(const float* x, int64_t k, int64_t k2, uint32_t* words, bool vectorized) {
  int16_t* codes = reinterpret_cast<int16_t*>(words);
  float m = 0.0f;
  int64_t i = 0;
#if defined(COLBERT_JAX_DENSE_INT16)
  if (vectorized) {
    __m512 mv = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) mv = _mm512_max_ps(mv, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    m = _mm512_reduce_max_ps(mv);
  }
#endif
  for (; i < k; ++i) m = std::max(m, std::fabs(x[i]));
  std::memset(codes, 0, k2 * 2 * sizeof(int16_t));
  if (!(m > 0.0f)) return 0.0f;
  const float inv = static_cast<float>(kMaxCode) / m;
  i = 0;
#if defined(COLBERT_JAX_DENSE_INT16)
  if (vectorized) {
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i hi = _mm512_set1_epi32(kMaxCode), lo = _mm512_set1_epi32(-kMaxCode);
    for (; i + 16 <= k; i += 16) {
      // cvtps rounds to nearest even (the default MXCSR), as nearbyint below and XLA's round
      __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), iv));
      c = _mm512_max_epi32(_mm512_min_epi32(c, hi), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), _mm512_cvtepi32_epi16(c));
    }
  }
#endif
  for (; i < k; ++i) {
    const float c = std::nearbyint(x[i] * inv);
    codes[i] = static_cast<int16_t>(std::min<float>(kMaxCode, std::max<float>(-kMaxCode, c)));
  }
  return m * (1.0f / static_cast<float>(kMaxCode));
}

// One pass's exact integer sum into the running float32 sum (pass 0: the sum alone), the kernel's order.
inline float AddPass(float running, int32_t pass, bool first) {
  return first ? static_cast<float>(pass) : running + static_cast<float>(pass);
}

// Rows [r0, r1) x one panel, plain loops in the kernel's order: row r's `width` outputs to dst + r * ldo.
void PanelScalar(const uint32_t* xw, const float* row_scales, int64_t r0, int64_t r1, int64_t k2,
                 const uint32_t* panel, const float* col_scales, int64_t width, float* dst, int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r) {
    float sum[kPanel] = {0};
    const int16_t* xr = reinterpret_cast<const int16_t*>(xw + r * k2);
    for (int64_t k0 = 0; k0 < k2; k0 += kDepth) {
      int32_t acc[kPanel] = {0};
      for (int64_t kk = k0; kk < std::min(k0 + kDepth, k2); ++kk) {
        const int16_t* w = reinterpret_cast<const int16_t*>(panel + kk * kPanel);
        for (int64_t j = 0; j < kPanel; ++j) {
          acc[j] += int32_t{xr[2 * kk]} * w[2 * j] + int32_t{xr[2 * kk + 1]} * w[2 * j + 1];
        }
      }
      for (int64_t j = 0; j < kPanel; ++j) sum[j] = AddPass(sum[j], acc[j], k0 == 0);
    }
    for (int64_t j = 0; j < width; ++j) dst[r * ldo + j] = (sum[j] * row_scales[r]) * col_scales[j];
  }
}

#if defined(COLBERT_JAX_DENSE_INT16)
// R rows (R <= 8) starting at row r x the first 16V columns of a panel, over pairs [k0, k1): the pass's int32
// sums in registers, added to the float32 sums of the passes before (the task's scratch `part`), and after the
// last pass scaled into dst; prefetching `pf_lines` lines of the weights the next pass reads.
template <int R, int V>
inline void BlockInt16(const uint32_t* xw, const float* row_scales, int64_t r, int64_t k2, int64_t k0, int64_t k1,
                       const uint32_t* panel, const float* col_scales, int64_t width, float* dst, int64_t ldo,
                       const char* pf, int64_t pf_lines, float* part) {
  using colbert_jax_native::Dpwssd;
  colbert_jax_native::I32x16 acc[R][V];
  for (int j = 0; j < R; ++j) {
    for (int v = 0; v < V; ++v) acc[j][v] = colbert_jax_native::ZeroI32x16();
  }
  const uint32_t* xr = xw + r * k2;
  const int64_t per_k = (pf_lines + (k1 - k0) - 1) / (k1 - k0);
  int64_t next = 0;
  for (int64_t i = k0; i < k1; ++i) {
    for (int64_t q = 0; q < per_k && next < pf_lines; ++q, ++next) _mm_prefetch(pf + next * 64, _MM_HINT_T1);
    __m512i b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_si512(panel + i * kPanel + 16 * v);
    for (int j = 0; j < R; ++j) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(xr[j * k2 + i]));
      for (int v = 0; v < V; ++v) acc[j][v] = Dpwssd(acc[j][v], a, b[v]);
    }
  }
  __m512 sum[R][V];
  for (int j = 0; j < R; ++j) {
    for (int v = 0; v < V; ++v) {
      sum[j][v] = _mm512_cvtepi32_ps((__m512i)acc[j][v]);
      if (k0 > 0) sum[j][v] = _mm512_add_ps(_mm512_loadu_ps(part + j * kPanel + 16 * v), sum[j][v]);
    }
  }
  if (k1 < k2) {
    for (int j = 0; j < R; ++j) {
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(part + j * kPanel + 16 * v, sum[j][v]);
    }
    return;
  }
  for (int v = 0; v < V; ++v) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, width - 16 * v));
    const __mmask16 keep = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512 cs = _mm512_maskz_loadu_ps(keep, col_scales + 16 * v);
    for (int j = 0; j < R; ++j) {
      const __m512 y = _mm512_mul_ps(_mm512_mul_ps(sum[j][v], _mm512_set1_ps(row_scales[r + j])), cs);
      _mm512_mask_storeu_ps(dst + (r + j) * ldo + 16 * v, keep, y);
    }
  }
}

template <int V>
void PanelRows(const uint32_t* xw, const float* row_scales, int64_t r0, int64_t r1, int64_t k2,
               const uint32_t* panel, const float* col_scales, int64_t width, float* dst, int64_t ldo,
               const uint32_t* w_end) {
  const int64_t blocks = (r1 - r0 + kRows - 1) / kRows;
  alignas(64) static thread_local float scratch[kRowsPerTask * kPanel];
  for (int64_t k0 = 0; k0 < k2; k0 += kDepth) {
    const int64_t k1 = std::min(k0 + kDepth, k2);
    const uint32_t* ahead = panel + k1 * kPanel;  // the next pass's weights (or the next panel's first)
    const char* pf = reinterpret_cast<const char*>(ahead);
    const int64_t lines = std::max<int64_t>(0, std::min<int64_t>(kDepth * kPanel, w_end - ahead)) * 4 / 64;
    const LineShares shares(lines, blocks);
    ForRowBlocks<kRows>(r0, r1, [&](auto rows, int64_t r, int64_t b) {
      BlockInt16<decltype(rows)::value, V>(xw, row_scales, r, k2, k0, k1, panel, col_scales, width, dst, ldo,
                                           pf + shares[b].first * 64, shares[b].count, scratch + (r - r0) * kPanel);
    });
  }
}
#endif

// Whether the vector path is compiled here (a build for a CPU type with AVX-512 VNNI).
bool VectorReady() {
#if defined(COLBERT_JAX_DENSE_INT16)
  return true;
#else
  return false;
#endif
}

// Rows [0, rows) of words x one panel, `width` outputs a row to dst + r * ldo, on the vector path where `vector`.
void Panel(bool vector, const uint32_t* xw, const float* row_scales, int64_t rows, int64_t k2, const uint32_t* panel,
           const float* col_scales, int64_t width, float* dst, int64_t ldo, const uint32_t* w_end) {
#if defined(COLBERT_JAX_DENSE_INT16)
  if (vector) {
    if (width <= 16) return PanelRows<1>(xw, row_scales, 0, rows, k2, panel, col_scales, width, dst, ldo, w_end);
    if (width <= 32) return PanelRows<2>(xw, row_scales, 0, rows, k2, panel, col_scales, width, dst, ldo, w_end);
    return PanelRows<3>(xw, row_scales, 0, rows, k2, panel, col_scales, width, dst, ldo, w_end);
  }
#endif
  (void)vector;
  (void)w_end;
  PanelScalar(xw, row_scales, 0, rows, k2, panel, col_scales, width, dst, ldo);
}

// The operands of one product, checked by the FFI handler below.
struct Operands {
  int64_t m, k, n, panels, k2;
  const float* x;           // float32 [M, K], quantized here
  const uint32_t* w;        // packed weight codes [panels, K2, 48] pairs
  const float* col_scales;  // [N]
  const float* gelu_bias;   // [N] or null
  const int32_t* rows_needed;
  int64_t split;
  float* out;  // float32 [M, N]
};

// The product; with `gelu_bias`, gelu(product + bias) in each panel's epilogue (as dense_bf16.cc); with
// `rows_needed`, the columns from `split` on for the wanted rows only, zero in the others (each computed row
// with the bits of the full product).
void Product(ffi::ThreadPool& pool, const Operands& op, int32_t vectorized) {
  const int64_t m = op.m, k = op.k, n = op.n, k2 = op.k2;
  const bool vector = vectorized && VectorReady();
  const bool gelu_vector = vectorized && GeluVectorReady();
  const uint32_t* w_end = op.w + op.panels * k2 * kPanel;
  const TaskGrid grid(m, op.panels, pool.num_threads(), kRowsPerTask);
  RunTasks(pool, grid.tasks(), 2 * m * k * n / kFlopsPerThread, 1, [&](int64_t t) {
    const int64_t r0 = grid.first_row(t), rows = std::min(r0 + kRowsPerTask, m) - r0;
    // Each task quantizes its own rows (in parallel, into its core's cache), and gathers the wanted ones.
    thread_local std::vector<uint32_t> words, compact;
    thread_local std::vector<float> scales, compact_scales, block;
    if (static_cast<int64_t>(words.size()) < rows * k2) words.resize(rows * k2);
    if (static_cast<int64_t>(scales.size()) < rows) scales.resize(rows);
    for (int64_t r = 0; r < rows; ++r) scales[r] = QuantizeRow(op.x + (r0 + r) * k, k, k2, words.data() + r * k2, vector);
    int64_t wanted = 0;
    if (op.rows_needed != nullptr && grid.end_unit(t) * kPanel > op.split) {
      if (static_cast<int64_t>(compact.size()) < rows * k2) compact.resize(rows * k2);
      if (static_cast<int64_t>(compact_scales.size()) < rows) compact_scales.resize(rows);
      if (static_cast<int64_t>(block.size()) < rows * kPanel) block.resize(rows * kPanel);
      wanted = GatherRows(op.rows_needed + r0, rows, words.data(), k2, compact.data());
      GatherRows(op.rows_needed + r0, rows, scales.data(), 1, compact_scales.data());
    }
    float* out_rows = op.out + r0 * n;
    for (int64_t p = grid.first_unit(t); p < grid.end_unit(t); ++p) {
      const uint32_t* panel = op.w + p * k2 * kPanel;
      const int64_t col = p * kPanel, width = std::min(kPanel, n - col);
      const float* cs = op.col_scales + col;
      if (op.rows_needed != nullptr && col >= op.split) {
        if (wanted > 0) {
          Panel(vector, compact.data(), compact_scales.data(), wanted, k2, panel, cs, width, block.data(), kPanel,
                w_end);
        }
        SpreadRows(op.rows_needed + r0, rows, block.data(), kPanel, width, out_rows + col, n);
        continue;
      }
      Panel(vector, words.data(), scales.data(), rows, k2, panel, cs, width, out_rows + col, n, w_end);
      if (op.gelu_bias != nullptr) {
        const FlushDenormals flush;
        GeluInPlace(out_rows + col, n, op.gelu_bias + col, rows, width, gelu_vector);
      }
    }
  });
}

// One handler's checks and product: `bias` [N] (the GELU's) and `rows_needed` [M] where given (else null).
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S16>& w,
               ffi::Buffer<ffi::F32>& col_scales, ffi::ResultBuffer<ffi::F32>& out, ffi::Buffer<ffi::F32>* bias,
               ffi::Buffer<ffi::S32>* rows_needed, int32_t split, int32_t vectorized) {
  auto x_dims = x.dimensions();
  auto w_dims = w.dimensions();
  auto o_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 4 || o_dims.size() != 2 || w_dims[2] != kPanel || w_dims[3] != 2) {
    return ffi::Error::InvalidArgument("dense_int16: x needs [M, K], packed weights [N / 48, K2, 48, 2]");
  }
  Operands op{};
  op.m = x_dims[0];
  op.k = x_dims[1];
  op.n = o_dims[1];
  op.panels = w_dims[0];
  op.k2 = w_dims[1];
  if (o_dims[0] != op.m || op.k2 != (op.k + 1) / 2 || op.panels * kPanel < op.n || op.panels * kPanel >= op.n + kPanel) {
    return ffi::Error::InvalidArgument("dense_int16: the packed weights do not fit x [M, K] and out [M, N]");
  }
  if (static_cast<int64_t>(col_scales.element_count()) != op.n) {
    return ffi::Error::InvalidArgument("dense_int16: the weights' scales need [N], N out's columns");
  }
  if (bias != nullptr && static_cast<int64_t>(bias->element_count()) != op.n) {
    return ffi::Error::InvalidArgument("dense_int16: the GELU's bias needs [N], N out's columns");
  }
  if (rows_needed != nullptr && static_cast<int64_t>(rows_needed->element_count()) != op.m) {
    return ffi::Error::InvalidArgument("dense_int16: rows_needed needs [M], M x's rows");
  }
  if (rows_needed != nullptr && (split < 0 || split % kPanel != 0)) {
    return ffi::Error::InvalidArgument("dense_int16: split needs a multiple of 48 >= 0");
  }
  op.x = x.typed_data();
  op.w = reinterpret_cast<const uint32_t*>(w.untyped_data());
  op.col_scales = col_scales.typed_data();
  op.out = out->typed_data();
  op.gelu_bias = bias == nullptr ? nullptr : bias->typed_data();
  op.rows_needed = rows_needed == nullptr ? nullptr : rows_needed->typed_data();
  op.split = split;
  if (op.m > 0) Product(pool, op, vectorized);
  return ffi::Error::Success();
}

ffi::Error DenseInt16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S16> w,
                      ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out, int32_t vectorized) {
  return Run(pool, x, w, scales, out, nullptr, nullptr, 0, vectorized);
}

ffi::Error DenseInt16Gelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S16> w,
                          ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                          int32_t vectorized) {
  return Run(pool, x, w, scales, out, &bias, nullptr, 0, vectorized);
}

ffi::Error DenseInt16Rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S16> w,
                          ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::S32> rows_needed,
                          ffi::ResultBuffer<ffi::F32> out, int32_t split, int32_t vectorized) {
  return Run(pool, x, w, scales, out, nullptr, &rows_needed, split, vectorized);
}

}  // namespace

extern "C" int colbert_jax_dense_int16_vector() { return VectorReady() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseInt16, DenseInt16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("vectorized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseInt16Gelu, DenseInt16Gelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("vectorized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseInt16Rows, DenseInt16Rows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("split")
                                  .Attr<int32_t>("vectorized"));
