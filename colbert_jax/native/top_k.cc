// `jax.lax.top_k` of float32 rows on the CPU (`colbert_jax.native.top_k`): the k largest values of each row,
// largest first, and their indices, the order XLA:CPU's TopK gives. XLA:CPU ranks by a comparator over
// indices (each value read through its bits, -NaN < -inf < -0 < +0 < +inf < +NaN, ties to the lower index)
// in a heap over the whole row; PLAID's stages 3-5 rank a thousand or more candidates down to a few hundred that
// way for every query. Here each element becomes one 64-bit key (that order's integer above, its complemented
// index below), so that the ranking is a selection and a sort of plain integers.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// XLA:CPU's order of a float32 as an int32 (its TopK's `convert_to_int`), made unsigned with the same order.
inline uint32_t OrderKey(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const int32_t key = static_cast<int32_t>(bits) < 0
                          ? static_cast<int32_t>(static_cast<uint32_t>(std::numeric_limits<int32_t>::max()) - bits)
                          : static_cast<int32_t>(bits);
  return static_cast<uint32_t>(key) ^ 0x80000000u;
}

// One row: x [n] -> values, indices [k] (k <= n), with `keys` as scratch.
void TopKRow(const float* x, int64_t n, int64_t k, float* values, int32_t* indices, std::vector<uint64_t>& keys) {
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = (static_cast<uint64_t>(OrderKey(x[i])) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
  }
  if (k < n) std::nth_element(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
  std::sort(keys.begin(), keys.begin() + k, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    const int32_t i = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(keys[j]));
    indices[j] = i;
    values[j] = x[i];
  }
}

ffi::Error TopK(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                ffi::ResultBuffer<ffi::S32> indices) {
  auto x_dims = x.dimensions();
  auto v_dims = values->dimensions();
  auto i_dims = indices->dimensions();
  if (x_dims.size() < 1 || v_dims.size() != x_dims.size() || i_dims.size() != x_dims.size()) {
    return ffi::Error::InvalidArgument("top_k: x [..., n], values and indices [..., k]");
  }
  for (size_t a = 0; a + 1 < x_dims.size(); ++a) {
    if (v_dims[a] != x_dims[a] || i_dims[a] != x_dims[a]) {
      return ffi::Error::InvalidArgument("top_k: values and indices keep x's leading axes");
    }
  }
  const int64_t n = x_dims.back(), k = v_dims.back();
  if (i_dims.back() != k || k > n || n > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument("top_k: k must be at most the last axis of x (and that under 2^31)");
  }
  if (k == 0) return ffi::Error::Success();
  const int64_t rows = n > 0 ? x.element_count() / n : 0;
  const float* xd = x.typed_data();
  float* vd = values->typed_data();
  int32_t* id = indices->typed_data();
  // one thread: a search program's rankings are a few rows each, and its other work runs beside them
  std::vector<uint64_t> keys;
  for (int64_t r = 0; r < rows; ++r) TopKRow(xd + r * n, n, k, vd + r * k, id + r * k, keys);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
