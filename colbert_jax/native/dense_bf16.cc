// A dense layer on bfloat16 operands with float32 sums (`colbert_jax.native.dense_bf16`), called from XLA
// programs through the XLA FFI: out [M, N] = bf16(x) [M, K] . bf16(w) [K, N], for the float32 query encoder's
// dense layers on CPUs with AVX-512 BF16 (`vdpbf16ps`: two products a lane an instruction, twice the float32 FMA
// rate on AMD Zen 4 and Zen 5).
//
// Weights arrive pre-packed (`colbert_jax.native.pack_dense_bf16`) as panels of 48 columns, [N / 48][K2][48][2]
// bfloat16 (K2 = ceil(K / 2); a column's coordinate pair (2kk, 2kk + 1) adjacent, zeros past K and N), so that
// a register block reads one contiguous stream and one 32-bit word is a pair. x is rounded to bfloat16 here
// (round to nearest even), row-major, so a row's pair is one broadcast word. The register block is 8 rows x 48
// columns: per pair 3 vector loads, 8 broadcasts and 24 vdpbf16ps.
//
// Every out[r, c] is one chain over the pairs kk ascending: per pair, the odd coordinate's product is added before
// the even one's (each product of two bfloat16 is exact in float32; the adds round to nearest even), the order
// the scalar path spells out. A row's result depends on that row of x alone: the same bits at every batch size.
//
// A second entry point adds a bias and applies the exact GELU in the epilogue (`dense_bf16(..., gelu_bias=)`:
// BERT's intermediate layer), with the bits of the GELU kernel (gelu.h) applied to this product.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "blocking.h"
#include "gelu.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::ForRowBlocks;
using colbert_jax_native::FromBf16;
using colbert_jax_native::FlushDenormals;
using colbert_jax_native::GeluInPlace;
using colbert_jax_native::GatherRows;
using colbert_jax_native::GeluVectorReady;
using colbert_jax_native::LineShares;
using colbert_jax_native::RunTasks;
using colbert_jax_native::SpreadRows;
using colbert_jax_native::TaskGrid;
using colbert_jax_native::ToBf16;

constexpr int64_t kPanel = 48;                // columns per packed panel
constexpr int64_t kRows = 8;                  // rows per register block
constexpr int64_t kRowsPerTask = 256;         // rows one task runs against its panels
constexpr int64_t kDepth = 64;                // pairs per pass over a task's rows: 12 KiB of the panel in L1
constexpr int64_t kFlopsPerThread = 1 << 21;  // below this much work per thread, fewer threads

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define COLBERT_JAX_DENSE_BF16 1
#endif

// x float32 [M, K] -> bfloat16 pairs [M, K2] (one uint32 word a pair, the even coordinate in the low half).
void RoundRows(const float* x, int64_t m, int64_t k, int64_t k2, uint32_t* out, bool vectorized) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    uint32_t* o = out + r * k2;
    int64_t i = 0;
#if defined(COLBERT_JAX_DENSE_BF16)
    if (vectorized) {
      for (; i + 32 <= k; i += 32) {  // 32 floats -> 16 words
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + i + 16), _mm512_loadu_ps(xr + i));
        _mm512_storeu_si512(o + i / 2, (__m512i)h);
      }
    }
#endif
    for (; i < k; i += 2) {
      const uint32_t lo = ToBf16(xr[i]), hi = i + 1 < k ? ToBf16(xr[i + 1]) : 0u;
      o[i / 2] = lo | (hi << 16);
    }
  }
}

// Rows [r0, r1) x one panel, plain loops in the kernel's order: row r's `width` sums to dst + r * ldo.
void PanelScalar(const uint32_t* xw, int64_t r0, int64_t r1, int64_t k2, const uint32_t* panel, int64_t width,
                 float* dst, int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[kPanel] = {0};
    const uint32_t* xr = xw + r * k2;
    for (int64_t kk = 0; kk < k2; ++kk) {
      const float xe = FromBf16(xr[kk] & 0xffffu), xo = FromBf16(xr[kk] >> 16);
      for (int64_t j = 0; j < kPanel; ++j) {
        const uint32_t w = panel[kk * kPanel + j];
        float a = acc[j];
        a = a + xo * FromBf16(w >> 16);
        a = a + xe * FromBf16(w & 0xffffu);
        acc[j] = a;
      }
    }
    std::memcpy(dst + r * ldo, acc, width * sizeof(float));
  }
}

#if defined(COLBERT_JAX_DENSE_BF16)
// R rows (R <= 8) starting at row r x the first 16V columns of a panel, over pairs [k0, k1): as dense_f32.cc's
// BlockAvx512, partial sums between passes in the task's scratch `part`, prefetching `pf_lines` lines of the
// weights the next pass reads.
template <int R, int V>
inline void BlockBf16(const uint32_t* xw, int64_t r, int64_t k2, int64_t k0, int64_t k1, const uint32_t* panel,
                      int64_t width, float* dst, int64_t ldo, const char* pf, int64_t pf_lines, float* part) {
  __m512 acc[R][V];
  for (int j = 0; j < R; ++j) {
    for (int v = 0; v < V; ++v) {
      acc[j][v] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(part + j * kPanel + 16 * v);
    }
  }
  const uint32_t* xr = xw + r * k2;
  const int64_t per_k = (pf_lines + (k1 - k0) - 1) / (k1 - k0);
  int64_t next = 0;
  for (int64_t i = k0; i < k1; ++i) {
    for (int64_t q = 0; q < per_k && next < pf_lines; ++q, ++next) _mm_prefetch(pf + next * 64, _MM_HINT_T1);
    __m512bh b[V];
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(panel + i * kPanel + 16 * v);
    for (int j = 0; j < R; ++j) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr[j * k2 + i]));
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], a, b[v]);
    }
  }
  if (k1 < k2) {
    for (int v = 0; v < V; ++v) {
      for (int j = 0; j < R; ++j) _mm512_storeu_ps(part + j * kPanel + 16 * v, acc[j][v]);
    }
    return;
  }
  for (int v = 0; v < V; ++v) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, width - 16 * v));
    const __mmask16 keep = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    for (int j = 0; j < R; ++j) {
      float* d = dst + (r + j) * ldo + 16 * v;
      if (left >= 16) {
        _mm512_storeu_ps(d, acc[j][v]);
      } else {
        _mm512_mask_storeu_ps(d, keep, acc[j][v]);
      }
    }
  }
}

template <int V>
void PanelRows(const uint32_t* xw, int64_t r0, int64_t r1, int64_t k2, const uint32_t* panel, int64_t width,
               float* dst, int64_t ldo, const uint32_t* w_end) {
  const int64_t blocks = (r1 - r0 + kRows - 1) / kRows;
  alignas(64) static thread_local float scratch[kRowsPerTask * kPanel];
  for (int64_t k0 = 0; k0 < k2; k0 += kDepth) {
    const int64_t k1 = std::min(k0 + kDepth, k2);
    const uint32_t* ahead = panel + k1 * kPanel;  // the next pass's weights (or the next panel's first)
    const char* pf = reinterpret_cast<const char*>(ahead);
    const int64_t lines = std::max<int64_t>(0, std::min<int64_t>(kDepth * kPanel, w_end - ahead)) * 4 / 64;
    const LineShares shares(lines, blocks);
    ForRowBlocks<kRows>(r0, r1, [&](auto rows, int64_t r, int64_t b) {
      BlockBf16<decltype(rows)::value, V>(xw, r, k2, k0, k1, panel, width, dst, ldo, pf + shares[b].first * 64,
                                          shares[b].count, scratch + (r - r0) * kPanel);
    });
  }
}

void PanelVector(const uint32_t* xw, int64_t r0, int64_t r1, int64_t k2, const uint32_t* panel, int64_t width,
                 float* dst, int64_t ldo, const uint32_t* w_end) {
  if (width <= 16) {
    PanelRows<1>(xw, r0, r1, k2, panel, width, dst, ldo, w_end);
  } else if (width <= 32) {
    PanelRows<2>(xw, r0, r1, k2, panel, width, dst, ldo, w_end);
  } else {
    PanelRows<3>(xw, r0, r1, k2, panel, width, dst, ldo, w_end);
  }
}
#endif

// Rows [0, rows) of words x one panel, `width` sums a row to dst + r * ldo, on the vector path where `vector`.
void Panel(bool vector, const uint32_t* xw, int64_t rows, int64_t k2, const uint32_t* panel, int64_t width,
           float* dst, int64_t ldo, const uint32_t* w_end) {
#if defined(COLBERT_JAX_DENSE_BF16)
  if (vector) {
    PanelVector(xw, 0, rows, k2, panel, width, dst, ldo, w_end);
    return;
  }
#endif
  (void)vector;
  (void)w_end;
  PanelScalar(xw, 0, rows, k2, panel, width, dst, ldo);
}

// Whether the vector path is compiled here and this CPU and OS run it.
bool VectorReady() {
#if defined(COLBERT_JAX_DENSE_BF16)
  return colbert_jax_native::CpuRunsAvx512Bf16();
#else
  return false;
#endif
}

// Rows [0, rows) x `width` columns of a float32 block (row stride ld) rounded to bfloat16 (to nearest even, as
// RoundRows rounds a product's input) into out16 (row stride ldo).
void RoundBlock(const float* block, int64_t ld, int64_t rows, int64_t width, uint16_t* out16, int64_t ldo,
                bool vectorized) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* br = block + r * ld;
    uint16_t* o = out16 + r * ldo;
    int64_t j = 0;
#if defined(COLBERT_JAX_DENSE_BF16)
    if (vectorized) {
      for (; j + 16 <= width; j += 16) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(br + j));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), (__m256i)h);
      }
    }
#endif
    for (; j < width; ++j) o[j] = ToBf16(br[j]);
  }
}

// The operands of one product, checked by the FFI handlers below.
struct Operands {
  int64_t m, k, n, panels, k2;
  const float* x;         // float32 [M, K], rounded here; or null and
  const uint32_t* words;  // x already rounded: bfloat16 [M, K] with K even, that is [M, K2] pairs
  const uint32_t* w;      // packed weights [panels, K2, 48] pairs
  const float* gelu_bias;
  const int32_t* rows_needed;
  int64_t split;
  float* out;        // float32 [M, N]; or null and
  uint16_t* out16;   // bfloat16 [M, N] (with gelu_bias only)
};

// The product, and with `gelu_bias` (bias [N]) gelu(product + bias) by gelu.h in each task's epilogue: a
// panel's [rows, 48] block of out, just stored and still in cache, goes through the GELU before the next panel,
// which spares the separate GELU kernel's pass over all of out in memory (the same bits as that kernel's).
// With `out16` the GELU's block goes to bfloat16 there, rounded as the next product would round its input: the
// MLP's second product then reads half the bytes and rounds nothing (`words`), with the same bits.
//
// With `rows_needed` ([M], nonzero where wanted), the columns from `split` on (a multiple of 48) are computed for
// the wanted rows only and are zero in the others: the fused query/key/value product of a query batch, whose
// keys and values at masked positions ([MASK] padding) no score ever weighs. The wanted rows' words are gathered
// into a compact block, so those panels run over fewer rows at full register-block width; each row's sums are
// the bits it gets in the full product (a row depends on that row alone).
void Product(ffi::ThreadPool& pool, const Operands& op, int32_t vectorized) {
  const int64_t m = op.m, k = op.k, n = op.n, k2 = op.k2;
  const bool vector = vectorized && VectorReady();
  const bool gelu_vector = vectorized && GeluVectorReady();
  const uint32_t* wd = op.w;
  const uint32_t* w_end = wd + op.panels * k2 * kPanel;
  const TaskGrid grid(m, op.panels, pool.num_threads(), kRowsPerTask);
  RunTasks(pool, grid.tasks(), 2 * m * k * n / kFlopsPerThread, 1, [&](int64_t t) {
    const int64_t r0 = grid.first_row(t), rows = std::min(r0 + kRowsPerTask, m) - r0;
    // Each task rounds its own rows (in parallel, and into its core's cache); a group's rows are rounded once
    // per chunk of panels, which is more than once only for small M, where rounding costs little.
    thread_local std::vector<uint32_t> rounded;
    const uint32_t* words = op.words == nullptr ? nullptr : op.words + r0 * k2;
    if (words == nullptr) {
      if (static_cast<int64_t>(rounded.size()) < rows * k2) rounded.resize(rows * k2);
      RoundRows(op.x + r0 * k, rows, k, k2, rounded.data(), vector);
      words = rounded.data();
    }
    // The wanted rows' words, gathered once per task, and a [wanted, 48] block for their sums (or, for a
    // bfloat16 output, the [rows, 48] block the GELU runs on).
    thread_local std::vector<uint32_t> compact;
    thread_local std::vector<float> block;
    int64_t wanted = 0;
    if (op.rows_needed != nullptr && grid.end_unit(t) * kPanel > op.split) {
      if (static_cast<int64_t>(compact.size()) < rows * k2) compact.resize(rows * k2);
      wanted = GatherRows(op.rows_needed + r0, rows, words, k2, compact.data());
    }
    if ((op.rows_needed != nullptr || op.out16 != nullptr) && static_cast<int64_t>(block.size()) < rows * kPanel) {
      block.resize(rows * kPanel);
    }
    float* out_rows = op.out == nullptr ? nullptr : op.out + r0 * n;
    for (int64_t p = grid.first_unit(t); p < grid.end_unit(t); ++p) {
      const uint32_t* panel = wd + p * k2 * kPanel;
      const int64_t col = p * kPanel, width = std::min(kPanel, n - col);
      if (op.rows_needed != nullptr && col >= op.split) {
        if (wanted > 0) Panel(vector, compact.data(), wanted, k2, panel, width, block.data(), kPanel, w_end);
        SpreadRows(op.rows_needed + r0, rows, block.data(), kPanel, width, out_rows + col, n);
        continue;
      }
      if (op.out16 != nullptr) {
        Panel(vector, words, rows, k2, panel, width, block.data(), kPanel, w_end);
        const FlushDenormals flush;
        GeluInPlace(block.data(), kPanel, op.gelu_bias + col, rows, width, gelu_vector);
        RoundBlock(block.data(), kPanel, rows, width, op.out16 + r0 * n + col, n, vector);
        continue;
      }
      Panel(vector, words, rows, k2, panel, width, out_rows + col, n, w_end);
      if (op.gelu_bias != nullptr) {
        const FlushDenormals flush;
        GeluInPlace(out_rows + col, n, op.gelu_bias + col, rows, width, gelu_vector);
      }
    }
  });
}

// The shapes of x [M, K] (K2 pairs a row), packed weights [N / 48, K2, 48, 2] and out [M, N], checked.
ffi::Error Shapes(ffi::Span<const int64_t> x_dims, bool x_rounded, ffi::Span<const int64_t> w_dims,
                  ffi::Span<const int64_t> o_dims, Operands& op) {
  if (x_dims.size() != 2 || w_dims.size() != 4 || o_dims.size() != 2 || w_dims[2] != kPanel || w_dims[3] != 2) {
    return ffi::Error::InvalidArgument("dense_bf16: x needs [M, K], packed weights [N / 48, K2, 48, 2]");
  }
  op.m = x_dims[0];
  op.k = x_dims[1];
  op.n = o_dims[1];
  op.panels = w_dims[0];
  op.k2 = w_dims[1];
  if (o_dims[0] != op.m || op.k2 != (op.k + 1) / 2 || op.panels * kPanel < op.n || op.panels * kPanel >= op.n + kPanel) {
    return ffi::Error::InvalidArgument("dense_bf16: the packed weights do not fit x [M, K] and out [M, N]");
  }
  if (x_rounded && op.k % 2 != 0) {
    return ffi::Error::InvalidArgument("dense_bf16: a bfloat16 x needs an even K (its rows are read as pairs)");
  }
  return ffi::Error::Success();
}

// x as the product reads it (float32 to round, or bfloat16 pairs as they are) and out as it writes it.
void SetX(ffi::Buffer<ffi::F32>& x, Operands& op) { op.x = x.typed_data(); }
void SetX(ffi::Buffer<ffi::BF16>& x, Operands& op) { op.words = reinterpret_cast<const uint32_t*>(x.untyped_data()); }
void SetOut(ffi::ResultBuffer<ffi::F32>& out, Operands& op) { op.out = out->typed_data(); }
void SetOut(ffi::ResultBuffer<ffi::BF16>& out, Operands& op) {
  op.out16 = reinterpret_cast<uint16_t*>(out->untyped_data());
}

// One handler's checks and product: `bias` [N] (the GELU's) and `rows_needed` [M] where given (else null).
template <ffi::DataType X, ffi::DataType O>
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<X>& x, ffi::Buffer<ffi::BF16>& w, ffi::ResultBuffer<O>& out,
               ffi::Buffer<ffi::F32>* bias, ffi::Buffer<ffi::S32>* rows_needed, int32_t split, int32_t vectorized) {
  Operands op{};
  if (auto e = Shapes(x.dimensions(), X == ffi::BF16, w.dimensions(), out->dimensions(), op); e.failure()) return e;
  if (bias != nullptr && static_cast<int64_t>(bias->element_count()) != op.n) {
    return ffi::Error::InvalidArgument("dense_bf16: the GELU's bias needs [N], N out's columns");
  }
  if (rows_needed != nullptr && static_cast<int64_t>(rows_needed->element_count()) != op.m) {
    return ffi::Error::InvalidArgument("dense_bf16: rows_needed needs [M], M x's rows");
  }
  if (rows_needed != nullptr && (split < 0 || split % kPanel != 0)) {
    return ffi::Error::InvalidArgument("dense_bf16: split needs a multiple of 48 >= 0");
  }
  SetX(x, op);
  op.w = reinterpret_cast<const uint32_t*>(w.untyped_data());
  SetOut(out, op);
  op.gelu_bias = bias == nullptr ? nullptr : bias->typed_data();
  op.rows_needed = rows_needed == nullptr ? nullptr : rows_needed->typed_data();
  op.split = split;
  if (op.m > 0) Product(pool, op, vectorized);
  return ffi::Error::Success();
}

ffi::Error DenseBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                     ffi::ResultBuffer<ffi::F32> out, int32_t vectorized) {
  return Run(pool, x, w, out, nullptr, nullptr, 0, vectorized);
}

ffi::Error DenseBf16Rounded(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                            ffi::ResultBuffer<ffi::F32> out, int32_t vectorized) {
  return Run(pool, x, w, out, nullptr, nullptr, 0, vectorized);
}

ffi::Error DenseBf16Gelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out, int32_t vectorized) {
  return Run(pool, x, w, out, &bias, nullptr, 0, vectorized);
}

ffi::Error DenseBf16GeluRounded(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                                ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::BF16> out, int32_t vectorized) {
  return Run(pool, x, w, out, &bias, nullptr, 0, vectorized);
}

ffi::Error DenseBf16Rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                         ffi::Buffer<ffi::S32> rows_needed, ffi::ResultBuffer<ffi::F32> out, int32_t split,
                         int32_t vectorized) {
  return Run(pool, x, w, out, nullptr, &rows_needed, split, vectorized);
}

}  // namespace

extern "C" int colbert_jax_dense_bf16_vector() { return VectorReady() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseBf16Gelu, DenseBf16Gelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("vectorized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseBf16GeluRounded, DenseBf16GeluRounded,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("vectorized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseBf16Rounded, DenseBf16Rounded,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("vectorized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseBf16Rows, DenseBf16Rows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("split")
                                  .Attr<int32_t>("vectorized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseBf16, DenseBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("vectorized"));
