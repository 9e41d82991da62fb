// The float32 query encoder's dense layers on the CPU (`colbert_jax.native.dense_f32`), called from XLA programs
// through the XLA FFI: out [M, N] = x [M, K] . w [K, N], float32 accumulation in k order.
//
// XLA:CPU runs a query's small products (tens of rows) on one core; this kernel splits the columns across the
// intra-op pool's threads. Weights arrive pre-packed (`colbert_jax.native.pack_dense_f32`) as panels of 48 or
// 16 columns, [N / W][K][W] (zero padding past N), so that a register block reads one contiguous stream of
// weights. AVX-512 builds take W = 48: a panel's k-th row is three vectors, and the inner loop is 3 vector
// loads, up to 8 broadcasts and 24 FMAs into registers (8 rows x 48 columns) per k. AVX2 builds take W = 16
// (16 registers of 8 lanes): 6 rows x 16 columns, 2 loads, 6 broadcasts and 12 FMAs per k. Either build
// reads either layout (the block walks a wider panel in parts).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "blocking.h"
#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::ForRowBlocks;
using colbert_jax_native::GatherRows;
using colbert_jax_native::SpreadRows;
using colbert_jax_native::RunTasks;
using colbert_jax_native::LineShares;
using colbert_jax_native::TaskGrid;

constexpr int64_t kPanel = 48;               // the widest packed panel (16 is the other)
constexpr int64_t kRows = 8;                 // rows per register block
constexpr int64_t kRowsPerTask = 256;        // rows one task runs against its panels (they stay in cache)
constexpr int64_t kDepth = 128;              // k per pass over a task's rows: 24 KiB of the panel stays in L1
constexpr int64_t kFlopsPerThread = 1 << 21;  // below this much work per thread, fewer threads

// Rows [r0, r1) x one panel `ld` wide, scalar (any CPU; also the reference order: k ascending, one FMA-free sum
// each).
void PanelScalar(const float* x, int64_t r0, int64_t r1, int64_t k, const float* panel, int64_t ld, int64_t col,
                 int64_t n, float* out) {
  const int64_t width = std::min(ld, n - col);
  for (int64_t r = r0; r < r1; ++r) {
    float acc[kPanel] = {0};
    const float* xr = x + r * k;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < ld; ++j) acc[j] += xr[i] * panel[i * ld + j];
    }
    std::memcpy(out + r * n + col, acc, width * sizeof(float));
  }
}

#if defined(__AVX512F__)
// R rows (R <= 8) starting at row r x the first 16V columns of one panel, over k in [k0, k1): RV accumulators in
// registers, starting from the partial sums in `part` ([R][kPanel], the task's scratch) unless k0 is 0, and
// ending in `part` too unless k1 is k, when they go to `out` (the same chain of FMAs, in the same order, as one
// pass over k). V < 3 for a last panel of at most 32 columns (queries' 32 tokens: stage 1). It
// also requests `pf_lines` cache lines from `pf` into L2, spread over its k: a pass's weights come from memory
// for its first row block only, which without them waited on each line while the FMA units idled.
template <int R, int V>
inline void BlockAvx512(const float* x, int64_t r, int64_t k, int64_t k0, int64_t k1, const float* panel,
                        int64_t ld, int64_t col, int64_t n, float* out, const char* pf, int64_t pf_lines,
                        float* part) {
  __m512 acc[R][V];
  const int64_t width = std::min(ld, n - col);
  __mmask16 keep[V];
  for (int v = 0; v < V; ++v) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, width - 16 * v));
    keep[v] = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
  }
  for (int j = 0; j < R; ++j) {
    for (int v = 0; v < V; ++v) {
      acc[j][v] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(part + j * kPanel + 16 * v);
    }
  }
  const float* xr = x + r * k;
  const int64_t per_k = (pf_lines + (k1 - k0) - 1) / (k1 - k0);
  int64_t next = 0;
  for (int64_t i = k0; i < k1; ++i) {
    for (int64_t q = 0; q < per_k && next < pf_lines; ++q, ++next) _mm_prefetch(pf + next * 64, _MM_HINT_T1);
    __m512 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(panel + i * ld + 16 * v);
    for (int j = 0; j < R; ++j) {
      const __m512 a = _mm512_set1_ps(xr[j * k + i]);
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_fmadd_ps(a, b[v], acc[j][v]);
    }
  }
  // Partial sums go to the task's contiguous scratch, not to `out`, whose rows are spread over pages and out of
  // L1 by the next pass; and masked stores only for a last panel's partial vectors (on Intel cores a masked store
  // to a line not in L1 costs far more than a plain one).
  if (k1 < k) {
    for (int v = 0; v < V; ++v) {
      for (int j = 0; j < R; ++j) _mm512_storeu_ps(part + j * kPanel + 16 * v, acc[j][v]);
    }
  } else if (width >= 16 * V) {
    for (int v = 0; v < V; ++v) {
      for (int j = 0; j < R; ++j) _mm512_storeu_ps(out + (r + j) * n + col + 16 * v, acc[j][v]);
    }
  } else {
    for (int v = 0; v < V; ++v) {
      for (int j = 0; j < R; ++j) _mm512_mask_storeu_ps(out + (r + j) * n + col + 16 * v, keep[v], acc[j][v]);
    }
  }
}

template <int V>
void PanelRows(const float* x, int64_t r0, int64_t r1, int64_t k, const float* panel, int64_t ld, int64_t col,
               int64_t n, float* out, const float* w_end) {
  const int64_t blocks = (r1 - r0 + kRows - 1) / kRows;
  // the rows' partial sums between passes (r1 - r0 <= kRowsPerTask)
  alignas(64) static thread_local float scratch[kRowsPerTask * kPanel];
  for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
    const int64_t k1 = std::min(k0 + kDepth, k);
    // the weights after this pass's (the next pass's, or the next panel's first pass's), shared by the row blocks
    const float* ahead = panel + k1 * ld;
    const char* pf = reinterpret_cast<const char*>(ahead);
    const int64_t lines = std::max<int64_t>(0, std::min<int64_t>(kDepth * ld, w_end - ahead)) * sizeof(float) / 64;
    const LineShares shares(lines, blocks);
    ForRowBlocks<kRows>(r0, r1, [&](auto rows, int64_t r, int64_t b) {
      BlockAvx512<decltype(rows)::value, V>(x, r, k, k0, k1, panel, ld, col, n, out, pf + shares[b].first * 64,
                                            shares[b].count, scratch + (r - r0) * kPanel);
    });
  }
}

void PanelAvx512(const float* x, int64_t r0, int64_t r1, int64_t k, const float* panel, int64_t ld, int64_t col,
                 int64_t n, float* out, const float* w_end) {
  const int64_t width = std::min(ld, n - col);
  if (width <= 16) {
    PanelRows<1>(x, r0, r1, k, panel, ld, col, n, out, w_end);
  } else if (width <= 32) {
    PanelRows<2>(x, r0, r1, k, panel, ld, col, n, out, w_end);
  } else {
    PanelRows<3>(x, r0, r1, k, panel, ld, col, n, out, w_end);
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define COLBERT_JAX_DENSE_AVX2 1
constexpr int64_t kPart = 16;  // AVX2's 16 registers hold 6 rows x 16 columns of sums, 2 loads and a broadcast
constexpr int64_t kRows2 = 6;
constexpr int64_t kDepth2 = 384;  // k per pass: 16 columns are one cache line a k, 24 KiB stay in L1

// R rows (R <= 6) starting at row r x the 8V columns of a panel `ld` wide starting at column `part` of it (0,
// 16 or 32), over k in [k0, k1): the same chain of FMAs, in the same order, as the AVX-512 block (so the same
// bits). 6 x 16 rather than 4 x 24: per k 2 vector loads and 6 broadcasts feed 12 FMAs (4 x 24 needs 3 loads
// of the panel that do not fit in registers beside its 12 sums, so each FMA reloads its operand). No masks
// either: a mask live across the k loop would take a sum's register; partial vectors (a last panel) go
// through a buffer.
template <int R, int V>
inline void BlockAvx2(const float* x, int64_t r, int64_t k, int64_t k0, int64_t k1, const float* panel,
                      int64_t ld, int64_t part, int64_t col, int64_t n, float* out) {
  __m256 acc[R][V];
  const int64_t width = std::min(kPart, n - col);
  for (int j = 0; j < R; ++j) {
    for (int v = 0; v < V; ++v) {
      const float* src = out + (r + j) * n + col + 8 * v;
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(8, width - 8 * v));
      if (k0 == 0) {
        acc[j][v] = _mm256_setzero_ps();
      } else if (left == 8) {
        acc[j][v] = _mm256_loadu_ps(src);
      } else {
        alignas(32) float buf[8] = {0};
        std::memcpy(buf, src, left * sizeof(float));
        acc[j][v] = _mm256_load_ps(buf);
      }
    }
  }
  const float* xr = x + r * k;
  const float* w = panel + part;
  for (int64_t i = k0; i < k1; ++i) {
    __m256 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm256_loadu_ps(w + i * ld + 8 * v);
    for (int j = 0; j < R; ++j) {
      const __m256 a = _mm256_set1_ps(xr[j * k + i]);
      for (int v = 0; v < V; ++v) acc[j][v] = _mm256_fmadd_ps(a, b[v], acc[j][v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(8, width - 8 * v));
    for (int j = 0; j < R; ++j) {
      float* dst = out + (r + j) * n + col + 8 * v;
      if (left == 8) {
        _mm256_storeu_ps(dst, acc[j][v]);
      } else {
        alignas(32) float buf[8];
        _mm256_store_ps(buf, acc[j][v]);
        std::memcpy(dst, buf, left * sizeof(float));
      }
    }
  }
}

template <int V>
void PartRows(const float* x, int64_t r0, int64_t r1, int64_t k, const float* panel, int64_t ld, int64_t part,
              int64_t col, int64_t n, float* out) {
  for (int64_t k0 = 0; k0 < k; k0 += kDepth2) {
    const int64_t k1 = std::min(k0 + kDepth2, k);
    ForRowBlocks<kRows2>(r0, r1, [&](auto rows, int64_t r, int64_t) {
      BlockAvx2<decltype(rows)::value, V>(x, r, k, k0, k1, panel, ld, part, col, n, out);
    });
  }
}

void PanelAvx2(const float* x, int64_t r0, int64_t r1, int64_t k, const float* panel, int64_t ld, int64_t col,
               int64_t n, float* out) {
  for (int64_t part = 0; part < ld && col + part < n; part += kPart) {
    if (n - col - part <= 8) {
      PartRows<1>(x, r0, r1, k, panel, ld, part, col + part, n, out);
    } else {
      PartRows<2>(x, r0, r1, k, panel, ld, part, col + part, n, out);
    }
  }
}
#endif

// One panel's columns for rows [r0, r1) of x, by the widest path compiled and asked for.
void Panel(bool vectorized, const float* x, int64_t r0, int64_t r1, int64_t k, const float* panel, int64_t ld,
           int64_t col, int64_t n, float* out, const float* w_end) {
#if defined(__AVX512F__)
  if (vectorized) {
    PanelAvx512(x, r0, r1, k, panel, ld, col, n, out, w_end);
    return;
  }
#elif defined(COLBERT_JAX_DENSE_AVX2)
  if (vectorized) {
    PanelAvx2(x, r0, r1, k, panel, ld, col, n, out);
    return;
  }
#endif
  (void)w_end;
  PanelScalar(x, r0, r1, k, panel, ld, col, n, out);
}

// The product. With `rows_needed` ([M], nonzero where wanted), the columns from `split` on (a multiple of the
// panel width) are computed for the wanted rows only and are zero in the others: the fused query/key/value
// product of a query batch, whose keys and values at masked positions ([MASK] padding) no score weighs. The
// wanted rows are gathered into a compact block, so those panels run over fewer rows at full register-block
// height; a row's sums are the bits it gets in the full product (each row's chain of FMAs is its own).
ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w,
               ffi::ResultBuffer<ffi::F32>& out, const int32_t* rows_needed, int64_t split, int32_t vectorized) {
  auto x_dims = x.dimensions();
  auto w_dims = w.dimensions();
  auto o_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || o_dims.size() != 2 || (w_dims[2] != 48 && w_dims[2] != 16)) {
    return ffi::Error::InvalidArgument("dense_f32: x needs [M, K], packed weights [N / W, K, W], W 48 or 16");
  }
  const int64_t m = x_dims[0], k = x_dims[1], n = o_dims[1], panels = w_dims[0], ld = w_dims[2];
  if (o_dims[0] != m || w_dims[1] != k || panels * ld < n || panels * ld >= n + ld) {
    return ffi::Error::InvalidArgument("dense_f32: the packed weights do not fit x [M, K] and out [M, N]");
  }
  if (rows_needed != nullptr && (split < 0 || split % ld != 0)) {
    return ffi::Error::InvalidArgument("dense_f32: split needs a multiple of the panel width >= 0");
  }
  if (m == 0) return ffi::Error::Success();
  const float* xd = x.typed_data();
  const float* wd = w.typed_data();
  const float* w_end = wd + panels * k * ld;
  float* o = out->typed_data();
  const TaskGrid grid(m, panels, pool.num_threads(), kRowsPerTask);
  RunTasks(pool, grid.tasks(), 2 * m * k * n / kFlopsPerThread, 1, [&](int64_t t) {
    const int64_t r0 = grid.first_row(t), r1 = std::min(r0 + kRowsPerTask, m), rows = r1 - r0;
    // the wanted rows of x, gathered once per task that reaches the split, and their [wanted, width] sums
    thread_local std::vector<float> compact, block;
    int64_t wanted = 0;
    if (rows_needed != nullptr && grid.end_unit(t) * ld > split) {
      if (static_cast<int64_t>(compact.size()) < rows * k) compact.resize(rows * k);
      if (static_cast<int64_t>(block.size()) < rows * ld) block.resize(rows * ld);
      wanted = GatherRows(rows_needed + r0, rows, xd + r0 * k, k, compact.data());
    }
    for (int64_t p = grid.first_unit(t); p < grid.end_unit(t); ++p) {
      const float* panel = wd + p * k * ld;
      const int64_t col = p * ld;
      if (rows_needed != nullptr && col >= split) {
        const int64_t width = std::min(ld, n - col);
        if (wanted > 0) Panel(vectorized, compact.data(), 0, wanted, k, panel, ld, 0, width, block.data(), w_end);
        SpreadRows(rows_needed + r0, rows, block.data(), width, width, o + r0 * n + col, n);
        continue;
      }
      Panel(vectorized, xd, r0, r1, k, panel, ld, col, n, o, w_end);
    }
  });
  return ffi::Error::Success();
}

ffi::Error DenseF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> out, int32_t vectorized) {
  return Run(pool, x, w, out, nullptr, 0, vectorized);
}

ffi::Error DenseF32Rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::S32> rows_needed, ffi::ResultBuffer<ffi::F32> out, int32_t split,
                        int32_t vectorized) {
  if (static_cast<int64_t>(rows_needed.element_count()) != (x.dimensions().size() == 2 ? x.dimensions()[0] : -1)) {
    return ffi::Error::InvalidArgument("dense_f32: rows_needed needs [M], M x's rows");
  }
  return Run(pool, x, w, out, rows_needed.typed_data(), split, vectorized);
}

}  // namespace

// The widest vector ISA this library was compiled for (-march): 512 (AVX-512F), 256 (AVX2 with FMA), 0 (other).
extern "C" int colbert_jax_vector_bits() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__) && defined(__FMA__)
  return 256;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseF32, DenseF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("vectorized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxDenseF32Rows, DenseF32Rows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("split")
                                  .Attr<int32_t>("vectorized"));
