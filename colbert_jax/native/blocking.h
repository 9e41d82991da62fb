// How the kernels cut their work, shared by the dense products (dense_f32.cc, dense_bf16.cc, dense_int8.cc) and
// stage 1 (centroid_scores_f32.cc, centroid_scores_bf16.cc): tasks over groups of rows x chunks of columns, a
// task's rows in register blocks of a compile-time height, and the cache lines a pass prefetches split among
// the blocks (or tiles) that run it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace colbert_jax_native {

// A count (a register block's height, a tile's width) as a type, so that the code it selects holds its sums in a
// fixed-size array the compiler keeps in registers.
template <int N>
using Const = std::integral_constant<int, N>;

// f(Const<n>{}) for the run-time count n, 1 <= n <= N; nothing otherwise.
template <int N, typename F>
inline void WithConst(int64_t n, F&& f) {
  if constexpr (N > 0) {
    if (n == N) {
      f(Const<N>{});
      return;
    }
    WithConst<N - 1>(n, f);
  }
}

// Rows [r0, r1) in blocks of kMax rows, then one shorter block of the rest: block(Const<R>{}, r, b), r the
// block's first row and b its index from 0.
template <int kMax, typename F>
inline void ForRowBlocks(int64_t r0, int64_t r1, F&& block) {
  int64_t r = r0, b = 0;
  for (; r + kMax <= r1; r += kMax, ++b) block(Const<kMax>{}, r, b);
  WithConst<kMax - 1>(r1 - r, [&](auto rows) { block(rows, r, b); });
}

// `lines` cache lines split among `parts` in near-equal runs: part i is lines [first, first + count) (count 0
// past the end).
struct LineShare {
  int64_t first, count;
};
class LineShares {
 public:
  LineShares(int64_t lines, int64_t parts) : lines_(lines), per_((lines + parts - 1) / parts) {}
  LineShare operator[](int64_t i) const {
    const int64_t first = std::min(lines_, i * per_);
    return {first, std::min(lines_, first + per_) - first};
  }

 private:
  int64_t lines_, per_;
};

// A product's tasks: groups of `rows_per_task` rows x chunks of its `units` column units (panels, block pairs),
// enough chunks that there are about two tasks a thread. Task t runs row group t / chunks against the units
// [per_chunk * c, per_chunk * (c + 1)) of chunk c = t % chunks (clipped to `units`).
struct TaskGrid {
  int64_t row_groups, chunks, per_chunk, units, rows_per_task;

  TaskGrid(int64_t rows, int64_t units_, int64_t threads, int64_t rows_per_task_)
      : row_groups((rows + rows_per_task_ - 1) / rows_per_task_),
        chunks(std::min<int64_t>(
            units_, std::max<int64_t>(1, (2 * std::max<int64_t>(threads, 1) + row_groups - 1) / row_groups))),
        per_chunk((units_ + chunks - 1) / chunks),
        units(units_),
        rows_per_task(rows_per_task_) {}

  int64_t tasks() const { return row_groups * chunks; }
  int64_t first_row(int64_t t) const { return t / chunks * rows_per_task; }
  int64_t first_unit(int64_t t) const { return std::min(units, t % chunks * per_chunk); }
  int64_t end_unit(int64_t t) const { return std::min(units, (t % chunks + 1) * per_chunk); }
};

// Products that compute some columns for some rows only (a fused query/key/value product skipping the keys and
// values of [MASK] padding): the task's rows [0, rows) that `needed` marks (nonzero), `stride` elements each of
// src, gathered in order into out; returns how many.
template <typename T>
inline int64_t GatherRows(const int32_t* needed, int64_t rows, const T* src, int64_t stride, T* out) {
  int64_t wanted = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (needed[r] == 0) continue;
    std::memcpy(out + wanted * stride, src + r * stride, stride * sizeof(T));
    ++wanted;
  }
  return wanted;
}

// ... and their results back: block [wanted, width] (row stride ldb) to the marked rows of out (row stride ldo),
// zeros to the others.
inline void SpreadRows(const int32_t* needed, int64_t rows, const float* block, int64_t ldb, int64_t width, float* out,
                       int64_t ldo) {
  int64_t j = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (needed[r] != 0) {
      std::memcpy(out + r * ldo, block + j++ * ldb, width * sizeof(float));
    } else {
      std::memset(out + r * ldo, 0, width * sizeof(float));
    }
  }
}

}  // namespace colbert_jax_native
