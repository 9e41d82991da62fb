"""This CPU's arithmetic peaks, per core and over all cores: float32 FMA, int8 dot products (AVX-512 VNNI,
else AVX2), bfloat16 dot products (avx512_bf16's vdpbf16ps, where the CPU has it) and int16 dot products (VNNI's
vpdpwssd, where the CPU has it), each a register-resident loop of independent accumulators (no memory traffic),
and the XLA products the query encoder runs, float32 and int8, for comparison (an XLA rate above the vector
unit's peak means a library ran it on a matrix unit: AMX tiles).

    python scripts/bench_cpu_peak.py [--repeats 3]
    python scripts/without_amx.py python scripts/bench_cpu_peak.py   # XLA's products without the tiles
    python scripts/without_amx.py --avx2 python scripts/bench_cpu_peak.py   # and without AVX-512

The figures bound what any encoder can reach here: the MiniLM query encoder's dense layers are about 680 MFLOP
per 32-token query (`bench_cpu_parts.py`), three times that in int8 operations for the two-term int8 encoder.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now() { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
// Independent accumulators: 16 of AVX-512's 32 registers; 12 of AVX2's 16, so that they and the loop's
// operands stay in registers (16 spilled to the stack and measured 0.6x the FMA units' rate on a Zen 3).
#if defined(__AVX512F__)
#define R(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
const int chains = 16;
#else
#define R(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
const int chains = 12;
#endif
int main() {
  const long n = 50000000;
#if defined(__AVX512F__)
  // int32 sums as __v16si, the VNNI builtins' type: GCC copies and spills __m512i (8 x int64) ones (native/vnni.h)
  typedef __m512 vf; typedef __v16si vi; const int lanes = 16;
#define SETF(x) _mm512_set1_ps(x)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define SUMF(a) _mm512_reduce_add_ps(a)
#define SETI(x) ((vi)_mm512_set1_epi32(x))
#define SUMI(a) _mm512_reduce_add_epi32((__m512i)(a))
#else
  typedef __m256 vf; typedef __m256i vi; const int lanes = 8;
#define SETF(x) _mm256_set1_ps(x)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define SUMF(a) (a[0] + a[7])
#define SETI(x) _mm256_set1_epi32(x)
#define SUMI(a) _mm256_extract_epi32(a, 0)
#endif
#define DF(i) vf a##i = SETF(i * 0.001f);
  R(DF)
  vf b = SETF(0.999f), c = SETF(0.0001f);
  double t = now();
  for (long i = 0; i < n; i++) {
#define FF(i) a##i = FMA(a##i, b, c);
    R(FF) __asm__ volatile("" : "+v"(b));  // b opaque: no folding of the loop
  }
  double dt = now() - t;
  float s = 0;
#define SF(i) s += SUMF(a##i);
  R(SF)
  printf("fp32 %.3f\n", n * chains * lanes * 2.0 / dt / 1e9 + 0 * s);
#define DI(i) vi v##i = SETI(i);
  R(DI)
  t = now();
#if defined(__AVX512VNNI__)
  __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5);
  for (long i = 0; i < n; i++) {
#define FI(i) v##i = (vi)_mm512_dpbusd_epi32((__m512i)v##i, x, y);
    R(FI) __asm__ volatile("" : "+v"(x));
  }
  const char* how = "vnni512";
#elif defined(__AVX512BW__)
  __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5), one = _mm512_set1_epi16(1);
  for (long i = 0; i < n; i++) {
#define FI(i) v##i = (vi)_mm512_add_epi32((__m512i)v##i, _mm512_madd_epi16(_mm512_maddubs_epi16(x, y), one));
    R(FI) __asm__ volatile("" : "+v"(x));
  }
  const char* how = "avx512bw";
#else
  vi x = _mm256_set1_epi8(3), y = _mm256_set1_epi8(5), one = _mm256_set1_epi16(1);
  for (long i = 0; i < n; i++) {
#define FI(i) v##i = _mm256_add_epi32(v##i, _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), one));
    R(FI) __asm__ volatile("" : "+v"(x));
  }
  const char* how = "avx2";
#endif
  dt = now() - t;
  int si = 0;
#define SI(i) si += SUMI(v##i);
  R(SI)
  printf("int8 %.3f %s %d\n", n * chains * lanes * 4 * 2.0 / dt / 1e9, how, si);
#if defined(__AVX512BF16__)
  // bfloat16 pairs into float32 lanes (vdpbf16ps): two products per lane per instruction
  __m512bh p = (__m512bh)_mm512_set1_epi16(0x3f80), q = (__m512bh)_mm512_set1_epi16(0x3f80);
#define DB(i) a##i = SETF(i * 0.001f);
  R(DB)
  t = now();
  for (long i = 0; i < n; i++) {
#define FB(i) a##i = _mm512_dpbf16_ps(a##i, p, q);
    R(FB) __asm__ volatile("" : "+v"(p));
  }
  dt = now() - t;
  s = 0;
  R(SF)
  printf("bf16 %.3f %d\n", n * chains * lanes * 2 * 2.0 / dt / 1e9, (int)(s * 0));
#else
  printf("bf16 0\n");
#endif
#if defined(__AVX512VNNI__)
  // int16 pairs into int32 lanes (vpdpwssd): two products per lane per instruction
  __m512i w = _mm512_set1_epi16(3), z = _mm512_set1_epi16(5);
#define ZI(i) v##i = SETI(i);
  R(ZI)
  t = now();
  for (long i = 0; i < n; i++) {
#define FW(i) v##i = (vi)_mm512_dpwssd_epi32((__m512i)v##i, w, z);
    R(FW) __asm__ volatile("" : "+v"(w));
  }
  dt = now() - t;
  si = 0;
  R(SI)
  printf("int16 %.3f %d\n", n * chains * lanes * 2 * 2.0 / dt / 1e9, si);
#else
  printf("int16 0\n");
#endif
  return 0;
}
"""


def vector_peaks(binary: Path, processes: int) -> tuple[float, float, float, float, str]:
    """(float32 GFLOP/s, int8 GOPS, bfloat16 dot GFLOP/s (0 without avx512_bf16), int16 dot GOPS (0 without
    AVX-512 VNNI), int8 instruction set) summed over `processes` copies running at once."""
    procs = [subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outs = [p.communicate()[0].split("\n") for p in procs]
    fp32, int8, bf16, int16 = (sum(float(o[line].split()[1]) for o in outs) for line in range(4))
    return fp32, int8, bf16, int16, outs[0][1].split()[2]


def xla_rates(repeats: int) -> tuple[float, float]:
    """XLA's [2048, 384] x [384, 1536] products: (float32 GFLOP/s, int8 GOPS), medians."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = rng.integers(-127, 128, (2048, 384)).astype(np.int8)
    b = rng.integers(-127, 128, (384, 1536)).astype(np.int8)
    ops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    f32 = jax.jit(lambda x, y: x @ y)
    i8 = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.int32))
    rates = []
    for fn, x, y in ((f32, a.astype(np.float32), b.astype(np.float32)), (i8, a, b)):
        x, y = jnp.asarray(x), jnp.asarray(y)
        fn(x, y).block_until_ready()
        times = []
        for _ in range(max(repeats, 1) * 10):
            t = time.perf_counter()
            fn(x, y).block_until_ready()
            times.append(time.perf_counter() - t)
        rates.append(ops / float(np.median(times)) / 1e9)
    return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-peak-"))
    (work / "peak.c").write_text(SOURCE)
    compiler = os.environ.get("CC", "gcc")
    # as the native kernels are built: for this CPU, or the older type `without_amx.py --avx2` names
    arch = os.environ.get("COLBERT_JAX_NATIVE_ARCH", "").strip() or "native"
    subprocess.run([compiler, "-O3", f"-march={arch}", str(work / "peak.c"), "-o", str(work / "peak")], check=True)
    rows = {"one core": [], f"{cores} cores": []}
    isa = "?"
    for _ in range(args.repeats):
        for name, procs in (("one core", 1), (f"{cores} cores", cores)):
            fp32, int8, bf16, int16, isa = vector_peaks(work / "peak", procs)
            rows[name].append((fp32, int8, bf16, int16))
    xla = [xla_rates(1) for _ in range(args.repeats)]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    amx = "amx_int8" in Path("/proc/cpuinfo").read_text()
    print(f"{cpu}, {cores} CPUs, {platform.machine()}, AMX-INT8 flag: {amx}; int8 loop: {isa}; {args.repeats} repeats")
    print("| | float32 GFLOP/s | int8 GOPS | bfloat16 dot GFLOP/s (vdpbf16ps) | int16 dot GOPS (vpdpwssd) |")
    print("|---|---|---|---|---|")

    def cell(values: list[float]) -> str:
        if max(values) == 0:
            return "- (not on this CPU)"
        return f"{np.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    for name, values in rows.items():
        print(f"| vector unit, {name} | " + " | ".join(cell([v[i] for v in values]) for i in range(4)) + " |")
    print(f"| XLA product [2048,384]x[384,1536] | {cell([v[0] for v in xla])} | {cell([v[1] for v in xla])} | | |")


if __name__ == "__main__":
    main()
