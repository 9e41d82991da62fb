"""One native kernel before and after a change, timed in one process: the kernel's source at a git revision and
in the working tree compiled side by side into one C++ harness (this CPU's flags, as `colbert_jax.native`
builds them), called in turn, call after call, on the same inputs, with the outputs checked bit for bit.

    python scripts/bench_kernel_ab.py dense_f32|dense_bf16|dense_int8|dense_int16 [--base REV] [--rows 2048]
        [--threads 1|2] [--calls 40]
    python scripts/bench_kernel_ab.py centroid_scores_f32|centroid_scores_int8 [--base REV] [--centroids 65536 8192]
        [--calls 100]
    python scripts/bench_kernel_ab.py attention [--base REV] [--batch 1 64] [--calls 100]
    python scripts/bench_kernel_ab.py maxsim_nibbles [--base REV] [--docs 64] [--calls 200]

On a shared, noisy machine two processes run minutes apart can differ by 2x; calls alternated within one
process meet the same neighbours, so their ratio is what a change is worth. `dense_f32` runs MiniLM's four
dense shapes (x [rows, K] . w [K, N], weights packed in panels of 48), the rows split across `--threads`
threads; `dense_bf16` the same shapes on bfloat16 operands (x rounded in the call, as each task of the FFI
handler rounds its rows; weights packed as bfloat16 pairs; AVX-512 BF16 builds only); `dense_int8` the same
shapes through the int8 layer's AVX-512 VNNI path (the activation split and the three products; arbitrary
weight bytes, column scales 1; AVX-512 VNNI builds only); `dense_int16` the same shapes on int16 operands (each
row quantized in the call as the handler's tasks do; weight codes within +-4095, column scales 1; AVX-512 VNNI
builds only); `centroid_scores_f32` runs one 32-token query's stage 1 and block maxima over 128-dimensional
centroids on one thread, `centroid_scores_int8` the same on int8 operands (the query quantized in the call;
arbitrary centroid code bytes and terms; AVX-512 VNNI builds only); `attention` MiniLM's self-attention (12
heads of 32, 32 tokens, keys past a row's length masked) for --batch rows on one thread, with the two sides'
largest difference printed (its sums may round differently: float32-accurate, not bit for bit);
`maxsim_nibbles` stage 6's MaxSim from the per-query nibble table (`plaid_cpu.cc`'s `MaxSimDocs32Nibbles`) over
--docs documents of 60-179 rows of 32 bytes (nbits 2, dim 128), spread over 20x their rows as candidates are in
an index, 32 query tokens, one thread. Each line prints
the median (and fastest) call of either side and the ratio of the medians (> 1: the working tree is faster).
AVX-512 builds only (the kernels' AVX-512 paths).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NATIVE = "colbert_jax/native"

# Each kernel: where its source is cut (the FFI handler and what follows: the harness calls the kernel's own
# functions) and the body of run(...) that calls them for one product.
FILES = {"maxsim_nibbles": "plaid_cpu"}  # a kernel whose source file has another name
KERNELS = {
    "maxsim_nibbles": (
        "template <ffi::DataType CodeType>\nffi::Error ExactMaxSim(",
        """
void RUN(const float* nib, const float* S, const uint16_t* codes, const uint8_t* res, const float* inv,
         const int32_t* starts, const int32_t* lens, float* out, int64_t p, int64_t bytes, int64_t rows,
         int64_t docs) {
  MaxSimDocs32Nibbles<uint16_t>(nib, S, nullptr, p, codes, res, bytes, inv, rows, starts, lens, out, 0, docs);
}
""",
    ),
    "dense_f32": (
        "ffi::Error DenseF32(",
        """
void RUN(const float* x, const float* w, float* out, int64_t m, int64_t k, int64_t n) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t r0 = 0; r0 < m; r0 += kRowsPerTask) {
    const int64_t r1 = std::min(r0 + kRowsPerTask, m);
    for (int64_t p = 0; p < panels; ++p)
      PanelAvx512(x, r0, r1, k, w + p * k * kPanel, kPanel, p * kPanel, n, out, w + panels * k * kPanel);
  }
}
""",
    ),
    "dense_bf16": (
        "// Whether the vector path is compiled here",
        """
// as one task of the handler: round a group's rows, then its panels
void RUN(const float* x, const float* w, float* out, int64_t m, int64_t k, int64_t n) {
  const int64_t k2 = (k + 1) / 2, panels = (n + kPanel - 1) / kPanel;
  const uint32_t* wd = reinterpret_cast<const uint32_t*>(w);
  thread_local std::vector<uint32_t> words;
  for (int64_t r0 = 0; r0 < m; r0 += kRowsPerTask) {
    const int64_t rows = std::min(r0 + kRowsPerTask, m) - r0;
    if (static_cast<int64_t>(words.size()) < rows * k2) words.resize(rows * k2);
    RoundRows(x + r0 * k, rows, k, k2, words.data(), true);
    for (int64_t p = 0; p < panels; ++p)
      PanelVector(words.data(), 0, rows, k2, wd + p * k2 * kPanel, std::min(kPanel, n - p * kPanel),
                  out + r0 * n + p * kPanel, n, wd + panels * k2 * kPanel);
  }
}
""",
    ),
    "dense_int8": (
        "bool AmxReady() {",
        """
// the VNNI path: the activation split, then the products over all column blocks, 64 rows at a time; the
// weights are the driver's float buffer read as bytes (w_hi then w_lo), every column scale 1
void RUN(const float* x, const float* w, float* out, int64_t m, int64_t k, int64_t n) {
  const int64_t kp = (k + 63) / 64 * 64, blocks = (n + 31) / 32 * 2;
  const int8_t* whi = reinterpret_cast<const int8_t*>(w);
  const int8_t* wlo = whi + blocks * 16 * kp;
  std::vector<float> xs(m), inv_w(blocks * 16, 1.0f);
  std::vector<int8_t> ahi(m * kp), alo(m * kp);
  std::vector<int32_t> sums(2 * m);
  for (int64_t r = 0; r < m; ++r)
    QuantizeRowVnni(x + r * k, k, kp, ahi.data() + r * kp, alo.data() + r * kp, xs.data() + r, sums.data() + 2 * r);
  for (int64_t r0 = 0; r0 < m; r0 += kRowsPerGroup)
    ProductsVnni(ahi.data(), alo.data(), xs.data(), sums.data(), r0, std::min(r0 + kRowsPerGroup, m), kp, whi, wlo,
                 inv_w.data(), 0, blocks, n, out);
}
""",
    ),
    "centroid_scores_f32": (
        "ffi::Error CentroidScoresF32(",
        """
// the two signatures the kernel has had: GroupsAvx512 with the maxima (6bb957f on), or BlockMaxima after it
template <typename F> auto Groups(F f, const float* c, const float* qt, int64_t dim, int64_t lqp, int64_t p,
    int64_t groups, int64_t lq, int64_t g0, int64_t g1, float* s, float* bm, int)
    -> decltype(f(c, qt, dim, lqp, p, groups, lq, g0, g1, s, bm)) {
  return f(c, qt, dim, lqp, p, groups, lq, g0, g1, s, bm);
}
template <typename F> void Groups(F f, const float* c, const float* qt, int64_t dim, int64_t lqp, int64_t p,
    int64_t groups, int64_t lq, int64_t g0, int64_t g1, float* s, float* bm, long) {
  f(c, qt, dim, lqp, p, groups, lq, g0, g1, s);
  BlockMaxima(s, g0 * kGroup, std::min(g1 * kGroup, p), lq, bm);
}
void RUN(const float* c, const float* qt, float* s, int64_t p, int64_t dim, int64_t lq, float* bm) {
  const int64_t groups = (p + kGroup - 1) / kGroup, lqp = (lq + 15) / 16 * 16;
  for (int64_t g0 = 0; g0 < groups; g0 += kGroupsPerTask) {
    const int64_t g1 = std::min(g0 + kGroupsPerTask, groups);
    Groups(GroupsAvx512, c, qt, dim, lqp, p, groups, lq, g0, g1, s, bm, 0);
  }
}
""",
    ),
    "dense_int16": (
        "// The operands of one product, checked",
        """
// as one task of the handler: quantize a group's rows, then its panels (every column scale 1)
void RUN(const float* x, const float* w, float* out, int64_t m, int64_t k, int64_t n) {
  const int64_t k2 = (k + 1) / 2, panels = (n + kPanel - 1) / kPanel;
  const uint32_t* wd = reinterpret_cast<const uint32_t*>(w);
  const uint32_t* w_end = wd + panels * k2 * kPanel;
  thread_local std::vector<uint32_t> words;
  thread_local std::vector<float> scales, col_scales;
  col_scales.assign(panels * kPanel, 1.0f);
  for (int64_t r0 = 0; r0 < m; r0 += kRowsPerTask) {
    const int64_t rows = std::min(r0 + kRowsPerTask, m) - r0;
    if (static_cast<int64_t>(words.size()) < rows * k2) words.resize(rows * k2);
    if (static_cast<int64_t>(scales.size()) < rows) scales.resize(rows);
    for (int64_t r = 0; r < rows; ++r) scales[r] = QuantizeRow(x + (r0 + r) * k, k, k2, words.data() + r * k2, true);
    for (int64_t p = 0; p < panels; ++p)
      Panel(true, words.data(), scales.data(), rows, k2, wd + p * k2 * kPanel, col_scales.data() + p * kPanel,
            std::min(kPanel, n - p * kPanel), out + r0 * n + p * kPanel, n, w_end);
  }
}
""",
    ),
    "centroid_scores_int8": (
        "ffi::Error CentroidScoresInt8(",
        """
// as the handler runs one query on one thread: its tokens quantized and transposed, then every group's tiles;
// the packed codes are the driver's centroid floats read as bytes, each group's terms the floats past them
template <typename F> struct Params;
template <typename R, typename... A> struct Params<R (*)(A...)> { using type = std::tuple<A...>; };
void RUN(const float* c, const float* q, float* s, int64_t p, int64_t dim, int64_t lq, float* bm) {
  const int64_t dim4 = (dim + 3) / 4, lqp = (lq + 15) / 16 * 16, groups = (p + kGroup - 1) / kGroup;
  std::vector<uint8_t> codes(lqp * dim4 * 4, 128);
  std::vector<float> qs(lqp, 0.0f);
  for (int64_t t = 0; t < lq; ++t) qs[t] = QuantizeToken(q + t * dim, dim, codes.data() + t * dim4 * 4);
  std::vector<uint32_t> qq(dim4 * lqp);
  for (int64_t t = 0; t < lqp; ++t) {
    for (int64_t kq = 0; kq < dim4; ++kq) std::memcpy(&qq[kq * lqp + t], codes.data() + t * dim4 * 4 + kq * 4, 4);
  }
  const uint32_t* cw = reinterpret_cast<const uint32_t*>(c);
  const float* tm = c + groups * kGroup * dim4;
  // S as the kernel stores it (float32 before 2026-12-07, float16 since): TileInt8's tenth parameter
  using Out = std::tuple_element_t<9, typename Params<decltype(&TileInt8<1>)>::type>;
  ForGroupTiles(cw, dim4 * kGroup * sizeof(uint32_t), lqp, p, groups, lq, 0, groups, reinterpret_cast<Out>(s), bm,
                [&](auto vectors, int64_t g, int64_t rows, int64_t t0, const char* pf, int64_t pf_lines, auto* sg,
                    float* bg, bool first) {
                  TileInt8<decltype(vectors)::value>(cw + g * dim4 * kGroup, tm + g * kGroup * 2, qq.data(),
                                                     qs.data(), dim4, lqp, t0, rows, lq, sg, pf, pf_lines, bg, first);
                });
}
""",
    ),
    "attention": (
        "ffi::Error Attention(",
        """
// as the FFI handler runs it, one batch row and head after another on this thread
void RUN(const float* qkv, const float* pb, const float* kb, float* out, int64_t batch, int64_t len, int64_t heads,
         int64_t dim) {
  const int64_t hidden = heads * dim, width = 3 * hidden;
  const HeadFn vector = VectorHead(len, dim);
  for (int64_t t = 0; t < batch * heads; ++t) {
    const int64_t b = t / heads, h = t % heads;
    const float* base = qkv + b * len * width + h * dim;
    const float* hb = pb + h * dim;
    vector(base, base + hidden, base + 2 * hidden, hb, hb + hidden, hb + 2 * hidden, width, kb + b * len,
           out + b * len * hidden + h * dim, hidden);
  }
}
""",
    ),
}

DRIVER = r"""
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <cmath>
// weak: each kernel's units define one of the two signatures
__attribute__((weak)) void run_a(const float*, const float*, float*, int64_t, int64_t, int64_t, float*);
__attribute__((weak)) void run_b(const float*, const float*, float*, int64_t, int64_t, int64_t, float*);
__attribute__((weak)) void attention_a(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                                       int64_t);
__attribute__((weak)) void attention_b(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                                       int64_t);
__attribute__((weak)) void nibbles_a(const float*, const float*, const uint16_t*, const uint8_t*, const float*,
                                     const int32_t*, const int32_t*, float*, int64_t, int64_t, int64_t, int64_t);
__attribute__((weak)) void nibbles_b(const float*, const float*, const uint16_t*, const uint8_t*, const float*,
                                     const int32_t*, const int32_t*, float*, int64_t, int64_t, int64_t, int64_t);
static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
static void fill(std::vector<float>& v, uint32_t mul) {
  for (size_t i = 0; i < v.size(); ++i) v[i] = ((i * mul) % 1000) * 1e-3f - 0.5f;
}
template <typename F> static double timed(F f) { double t0 = now(); f(); return now() - t0; }
static void report(const char* what, double flops, std::vector<double> ta, std::vector<double> tb, bool same) {
  std::sort(ta.begin(), ta.end()); std::sort(tb.begin(), tb.end());
  const double a = ta[ta.size() / 2], b = tb[tb.size() / 2];
  std::printf("| %s | %.3f (%.3f) | %.3f (%.3f) | %.1f / %.1f | %.2fx | %s |\n", what, a * 1e3, ta[0] * 1e3, b * 1e3,
              tb[0] * 1e3, flops / a / 1e9, flops / b / 1e9, a / b, same ? "yes" : "NO");
}
int main(int argc, char** argv) {
  const bool dense = std::strncmp(argv[1], "dense", 5) == 0;
  const int calls = std::atoi(argv[2]), threads = std::atoi(argv[3]);
  for (int i = 4; i < argc; ++i) {
    std::vector<double> ta, tb;
    if (std::strcmp(argv[1], "maxsim_nibbles") == 0) {
      // argv: documents; 32 bytes a row (nbits 2, dim 128), 4,096 centroids, 32 query tokens
      const long docs = std::atol(argv[i]), bytes = 32, p = 4096, spread = 20;
      std::vector<int32_t> lens(docs), starts(docs);
      long rows = 0;
      for (long d = 0; d < docs; ++d) {
        lens[d] = 60 + (d * 2654435761u) % 120;
        starts[d] = rows * spread;
        rows += lens[d];
      }
      const long total = rows * spread + 256;
      std::vector<uint8_t> res(total * bytes);
      for (size_t j = 0; j < res.size(); ++j) res[j] = static_cast<uint8_t>((j * 2654435761u) >> 13);
      std::vector<uint16_t> codes(total);
      for (size_t j = 0; j < codes.size(); ++j) codes[j] = static_cast<uint16_t>((j * 40503u) % p);
      std::vector<float> inv(total, 1.0f), S(p * 32), nib(bytes * 2 * 16 * 32), oa(docs * 32), ob(docs * 32);
      fill(S, 2654435761u); fill(nib, 40503u);
      for (auto& x : nib) x *= 0.1f;
      for (int c = 0; c < calls; ++c) {
        ta.push_back(timed([&] { nibbles_a(nib.data(), S.data(), codes.data(), res.data(), inv.data(), starts.data(),
                                           lens.data(), oa.data(), p, bytes, total, docs); }));
        tb.push_back(timed([&] { nibbles_b(nib.data(), S.data(), codes.data(), res.data(), inv.data(), starts.data(),
                                           lens.data(), ob.data(), p, bytes, total, docs); }));
      }
      char what[64]; std::snprintf(what, sizeof what, "%ld documents, %ld rows", docs, rows);
      report(what, 2.0 * rows * bytes * 2 * 32, ta, tb, oa == ob);  // "flops": the table's adds
    } else if (std::strcmp(argv[1], "attention") == 0) {
      // argv: B:L:H:D; keys past the middle of each row masked, as padding is
      long b, len, heads, dim;
      std::sscanf(argv[i], "%ld:%ld:%ld:%ld", &b, &len, &heads, &dim);
      std::vector<float> qkv(b * len * 3 * heads * dim), pb(3 * heads * dim), kb(b * len, 0.0f);
      std::vector<float> oa(b * len * heads * dim), ob(oa.size());
      fill(qkv, 2654435761u); fill(pb, 40503u);
      for (auto& x : qkv) x *= 4.0f;
      for (long r = 0; r < b; ++r)
        for (long j = len / 2 + r % (len / 2); j < len; ++j) kb[r * len + j] = -3.4028235e38f;
      for (int c = 0; c < calls; ++c) {
        ta.push_back(timed([&] { attention_a(qkv.data(), pb.data(), kb.data(), oa.data(), b, len, heads, dim); }));
        tb.push_back(timed([&] { attention_b(qkv.data(), pb.data(), kb.data(), ob.data(), b, len, heads, dim); }));
      }
      float diff = 0.0f, top = 0.0f;
      for (size_t j = 0; j < oa.size(); ++j) {
        diff = std::max(diff, std::fabs(oa[j] - ob[j]));
        top = std::max(top, std::fabs(oa[j]));
      }
      char what[96];
      std::snprintf(what, sizeof what, "B %ld, L %ld, %ld heads of %ld (largest difference %.1e of %.2g)", b, len,
                    heads, dim, diff, top);
      report(what, 4.0 * b * heads * len * len * dim, ta, tb, oa == ob);
    } else if (dense) {
      // argv: rows:K:N
      long m, k, n;
      std::sscanf(argv[i], "%ld:%ld:%ld", &m, &k, &n);
      std::vector<float> x(m * k), w((n + 47) / 48 * 48 * k), oa(m * n), ob(m * n);
      fill(x, 2654435761u); fill(w, 40503u);
      if (std::strcmp(argv[1], "dense_int16") == 0) {
        // each 32-bit word a pair of int16 codes within +-4095, as the packing writes them
        std::vector<float> v(2 * w.size());
        fill(v, 40503u);
        for (size_t j = 0; j < w.size(); ++j) {
          const uint32_t lo = static_cast<uint16_t>(static_cast<int16_t>(v[2 * j] * 8190.0f));
          const uint32_t hi = static_cast<uint16_t>(static_cast<int16_t>(v[2 * j + 1] * 8190.0f));
          const uint32_t word = lo | (hi << 16);
          std::memcpy(&w[j], &word, 4);
        }
      }
      if (std::strcmp(argv[1], "dense_bf16") == 0) {
        // each 32-bit word a pair of bfloat16 (the high halves of two weights), not a float's low bits
        std::vector<float> v(2 * w.size());
        fill(v, 40503u);
        for (size_t j = 0; j < w.size(); ++j) {
          uint32_t lo, hi;
          std::memcpy(&lo, &v[2 * j], 4); std::memcpy(&hi, &v[2 * j + 1], 4);
          const uint32_t word = (lo >> 16) | (hi & 0xffff0000u);
          std::memcpy(&w[j], &word, 4);
        }
      }
      auto split = [&](auto run, float* o) {
        const int64_t h = m / threads;
        std::vector<std::thread> pool;
        for (int t = 1; t < threads; ++t)
          pool.emplace_back([&, t] {
            const int64_t rows = t + 1 == threads ? m - t * h : h;
            run(x.data() + t * h * k, w.data(), o + t * h * n, rows, k, n, nullptr);
          });
        run(x.data(), w.data(), o, threads == 1 ? m : h, k, n, nullptr);
        for (auto& p : pool) p.join();
      };
      for (int c = 0; c < calls; ++c) {
        ta.push_back(timed([&] { split(run_a, oa.data()); }));
        tb.push_back(timed([&] { split(run_b, ob.data()); }));
      }
      char what[64]; std::snprintf(what, sizeof what, "%ld rows, %ldx%ld", m, k, n);
      report(what, 2.0 * m * k * n, ta, tb, oa == ob);
    } else {
      const long p = std::atol(argv[i]), dim = 128, lq = 32;
      std::vector<float> c((p + 7) / 8 * 8 * dim), qt(dim * lq), sa(p * lq), sb(p * lq);
      std::vector<float> ma((p + 127) / 128 * lq), mb(ma.size());
      fill(c, 2654435761u); fill(qt, 40503u);
      for (int k = 0; k < calls; ++k) {
        ta.push_back(timed([&] { run_a(c.data(), qt.data(), sa.data(), p, dim, lq, ma.data()); }));
        tb.push_back(timed([&] { run_b(c.data(), qt.data(), sb.data(), p, dim, lq, mb.data()); }));
      }
      char what[64]; std::snprintf(what, sizeof what, "%ld centroids", p);
      report(what, 2.0 * p * dim * lq, ta, tb, sa == sb && ma == mb);
    }
  }
}
"""

# run(...) adapters to the driver's one signature
ADAPT = {
    "dense_f32": "void {name}(const float* x, const float* w, float* o, int64_t m, int64_t k, int64_t n, float*) "
    "{{ RUN(x, w, o, m, k, n); }}",
    "dense_bf16": "void {name}(const float* x, const float* w, float* o, int64_t m, int64_t k, int64_t n, float*) "
    "{{ RUN(x, w, o, m, k, n); }}",
    "dense_int8": "void {name}(const float* x, const float* w, float* o, int64_t m, int64_t k, int64_t n, float*) "
    "{{ RUN(x, w, o, m, k, n); }}",
    "attention": "void attention_{tail}(const float* x, const float* pb, const float* kb, float* o, int64_t b, "
    "int64_t len, int64_t heads, int64_t dim) {{ RUN(x, pb, kb, o, b, len, heads, dim); }}",
    "centroid_scores_f32": "void {name}(const float* c, const float* qt, float* s, int64_t p, int64_t dim, int64_t lq, "
    "float* bm) {{ RUN(c, qt, s, p, dim, lq, bm); }}",
    "centroid_scores_int8": "void {name}(const float* c, const float* q, float* s, int64_t p, int64_t dim, int64_t lq, "
    "float* bm) {{ RUN(c, q, s, p, dim, lq, bm); }}",
    "dense_int16": "void {name}(const float* x, const float* w, float* o, int64_t m, int64_t k, int64_t n, float*) "
    "{{ RUN(x, w, o, m, k, n); }}",
    "maxsim_nibbles": "void nibbles_{tail}(const float* nib, const float* S, const uint16_t* codes, "
    "const uint8_t* res, const float* inv, const int32_t* starts, const int32_t* lens, float* out, int64_t p, "
    "int64_t bytes, int64_t rows, int64_t docs) {{ RUN(nib, S, codes, res, inv, starts, lens, out, p, bytes, "
    "rows, docs); }}",
}


def _unit(kernel: str, source: str, name: str) -> str:
    cut, run = KERNELS[kernel]
    head = source.split(cut, 1)[0]
    if head == source:
        raise SystemExit(f"{kernel}: the source has no `{cut}` to cut at")
    adapter = ADAPT[kernel].format(name=name, tail=name[-1])
    return f"{head}\n{run}\n}}  // namespace\n{adapter}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", choices=sorted(KERNELS))
    ap.add_argument("--base", default="HEAD", help="git revision of the 'before' source (default HEAD)")
    ap.add_argument("--rows", type=int, nargs="+", default=[2048], help="dense kernels: rows of x")
    ap.add_argument("--threads", type=int, default=1, help="dense kernels: threads, each a share of the rows")
    ap.add_argument("--centroids", type=int, nargs="+", default=[65536, 8192], help="centroid_scores_f32/_int8: P")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="attention: batch rows (MiniLM's heads)")
    ap.add_argument("--docs", type=int, nargs="+", default=[64], help="maxsim_nibbles: documents a call")
    ap.add_argument("--calls", type=int, default=None, help="calls per side (default 40 dense, 100 stage 1)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import jax.ffi

    from colbert_jax import native

    path = f"{NATIVE}/{FILES.get(args.kernel, args.kernel)}.cc"
    show = ["git", "show", f"{args.base}:{path}"]
    before = subprocess.run(show, cwd=REPO, check=True, capture_output=True, text=True)
    after = (REPO / path).read_text()
    flags = [*native.FLAGS, f"-march={native._arch()}", *native.X86_FLAGS]
    flags = [f for f in flags if f not in ("-shared", "-fPIC")]
    cxx = os.environ.get("CXX", "g++")  # as colbert_jax.native builds
    calls = args.calls or (40 if args.kernel.startswith("dense") else 100)
    if args.kernel == "maxsim_nibbles":
        shapes = [str(d) for d in args.docs]
    elif args.kernel == "attention":
        shapes = [f"{b}:32:12:32" for b in args.batch]
    elif args.kernel.startswith("dense"):
        shapes = [f"{m}:{k}:{n}" for m in args.rows for k, n in ((384, 1152), (384, 384), (384, 1536), (1536, 384))]
    else:
        shapes = [str(p) for p in args.centroids]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        objects = []
        for name, source in (("run_a", before.stdout), ("run_b", after)):
            unit = tmp / f"{name}.cc"
            unit.write_text(_unit(args.kernel, source, name).replace("RUN(", f"{name}_impl("))
            obj = tmp / f"{name}.o"
            cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), "-I", str(REPO / NATIVE), "-c", str(unit), "-o", str(obj)]
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        (tmp / "driver.cc").write_text(DRIVER)
        exe = tmp / "harness"
        link = [cxx, "-O3", "-std=c++17", str(tmp / "driver.cc"), *objects, "-o", str(exe), "-lpthread"]
        subprocess.run(link, check=True)
        print(
            f"{args.kernel}: {args.base} (a) against the working tree (b); {calls} calls each, alternated; "
            f"{args.threads if args.kernel.startswith('dense') else 1} thread(s)"
        )
        print("| shape | a median ms (fastest) | b median ms (fastest) | GFLOP/s a / b | a / b | same bits |")
        print("|---|---|---|---|---|---|")
        subprocess.run([str(exe), args.kernel, str(calls), str(args.threads), *shapes], check=True)


if __name__ == "__main__":
    main()
