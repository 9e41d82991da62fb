// A BERT output block's tail on the CPU (`colbert_jax.native.add_layer_norm`), called from XLA programs through
// the XLA FFI: the dense layer's bias, the residual and the LayerNorm in one pass over each row,
//   x = (h + h_bias) + residual;  mean = sum(x) / n;  var = sum((x - mean)^2) / n  (two-pass, as torch);
//   out = (x - mean) * (scale / sqrt(var + eps)) + bias,
// where XLA:CPU runs five ops (two reductions) over the block. float32 sums in this kernel's order: float32-
// accurate, not XLA's bits. Each row depends on itself alone (batch invariance).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using colbert_jax_native::RunTasks;

constexpr int64_t kRowsPerTask = 32;

typedef float Vec16 __attribute__((vector_size(64)));

inline Vec16 Load(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }

inline float Total(Vec16 v) {
  float t = 0.0f;
  for (int i = 0; i < 16; ++i) t += v[i];
  return t;
}

// Rows [r0, r1): sums over 16 lanes (then the lanes), the columns past the last multiple of 16 one by one.
void Rows(const float* h, const float* h_bias, const float* residual, const float* scale, const float* bias,
          float eps, float* out, int64_t r0, int64_t r1, int64_t n) {
  thread_local std::vector<float> x;
  if (x.size() < static_cast<size_t>(n)) x.resize(n);
  const int64_t whole = n / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const float* hr = h + r * n;
    const float* rr = residual + r * n;
    Vec16 lanes = Vec16{};
    for (int64_t j = 0; j < whole; j += 16) {
      const Vec16 v = (Load(hr + j) + Load(h_bias + j)) + Load(rr + j);
      Store(x.data() + j, v);
      lanes += v;
    }
    float sum = Total(lanes);
    for (int64_t j = whole; j < n; ++j) {
      x[j] = (hr[j] + h_bias[j]) + rr[j];
      sum += x[j];
    }
    const float mean = sum / static_cast<float>(n);
    lanes = Vec16{};
    for (int64_t j = 0; j < whole; j += 16) {
      const Vec16 d = Load(x.data() + j) - mean;
      lanes += d * d;
    }
    float squares = Total(lanes);
    for (int64_t j = whole; j < n; ++j) squares += (x[j] - mean) * (x[j] - mean);
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
    float* o = out + r * n;
    for (int64_t j = 0; j < whole; j += 16) {
      Store(o + j, (Load(x.data() + j) - mean) * (Load(scale + j) * inv) + Load(bias + j));
    }
    for (int64_t j = whole; j < n; ++j) o[j] = (x[j] - mean) * (scale[j] * inv) + bias[j];
  }
}

ffi::Error AddLayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> h_bias,
                        ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                        ffi::ResultBuffer<ffi::F32> out, float eps) {
  auto dims = h.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("add_layer_norm: needs h [M, N]");
  const int64_t m = dims[0], n = dims[1];
  if (residual.element_count() != m * n || out->element_count() != m * n || h_bias.element_count() != n ||
      scale.element_count() != n || bias.element_count() != n) {
    return ffi::Error::InvalidArgument("add_layer_norm: residual and out [M, N], h_bias, scale and bias [N]");
  }
  const float* hd = h.typed_data();
  const float* hb = h_bias.typed_data();
  const float* rd = residual.typed_data();
  const float* sd = scale.typed_data();
  const float* bd = bias.typed_data();
  float* o = out->typed_data();
  const int64_t tasks = (m + kRowsPerTask - 1) / kRowsPerTask;
  RunTasks(pool, tasks, m * n / 16, 1 << 12, [=](int64_t t) {
    const int64_t r0 = t * kRowsPerTask;
    Rows(hd, hb, rd, sd, bd, eps, o, r0, std::min(r0 + kRowsPerTask, m), n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ColbertJaxAddLayerNorm, AddLayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
