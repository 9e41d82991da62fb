"""Two products whose cost for one query is set by memory traffic more than arithmetic, on CPUs without AMX:

1. Stage 1, centroid scores S = C . Q^T for one query (32 tokens, dim 128) against P centroids (P x 512 bytes
   of float32 read per query: 32 MB at 65,536, the 100x bench index): XLA's float32 product (what CPUs without
   AMX-BF16 run before `native.centroid_scores_f32`), that kernel (centroids in groups of 8: one sequential
   read per group), `native.dense_f32` over the centroid rows (Q^T as its one 32-column panel, rows split across
   threads: 8 strided reads per block), and `dense_f32` with the centroids packed as its weight panels (Q as
   the rows: out [32, P], sequential panel reads), without and with the transpose to S's [P, 32].
2. The float32 query encoder's 24 dense products for one query (MiniLM's shapes, native `dense_f32`): six
   layers' distinct weights (42 MB, as the encoder runs), three layers' weights used twice (21 MB: what float16
   weights would occupy) and one layer's six times (7 MB, in cache).

    python scripts/bench_memory_bound.py [--centroids 4096 16384 65536] [--repeats 5] [--calls N]

Needs the native kernels (a C++ compiler). Every variant runs back to back within each repeat, --calls times
(default 30 for stage 1, 100 for the encoder chain); prints the median ms (min-max over repeats' medians), the
fastest call and the first quartile of all calls (steadier than the median on a shared, noisy host), and GFLOP/s
at the median. Before/after a kernel change: run it from each checkout in turn, alternating.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from colbert_jax import native

HIGHEST = jax.lax.Precision.HIGHEST
ENCODER_SHAPES = ((384, 1152), (384, 384), (384, 1536), (1536, 384))  # fused QKV, attention out, MLP up, down


def _call_ms(fn, args, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1000 * (time.perf_counter() - t0))
    return times


def _table(title: str, flops: float, variants: dict, repeats: int, calls: int) -> None:
    for fn, args in variants.values():
        jax.block_until_ready(fn(*args))  # compile
    medians: dict[str, list[float]] = {name: [] for name in variants}
    every: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, args) in variants.items():
            times = _call_ms(fn, args, calls)
            medians[name].append(float(np.median(times)))
            every[name] += times
    for name, values in medians.items():
        med, fastest, p25 = float(np.median(values)), min(every[name]), float(np.percentile(every[name], 25))
        print(
            f"| {title} | {name} | {med:.2f} ({min(values):.2f}-{max(values):.2f}) | {fastest:.2f} | {p25:.2f} "
            f"| {flops / med / 1e6:.0f} |"
        )


def stage1(num_centroids: int, repeats: int, rng: np.random.Generator, calls: int = 30) -> None:
    centroids = rng.standard_normal((num_centroids, 128), np.float32)
    C, Q = jnp.asarray(centroids), jnp.asarray(rng.standard_normal((32, 128), np.float32))
    panels = jnp.asarray(native.pack_dense_f32(centroids.T))

    def rows(C, Q):
        return native.dense_f32(C, jnp.pad(Q.T, ((0, 0), (0, 48 - 32)))[None], 32)  # one panel 48 wide

    blocked = jnp.asarray(native.block_centroids(centroids))
    variants = {
        "XLA float32 product": (jax.jit(lambda C, Q: jnp.dot(C, Q.T, precision=HIGHEST)), (C, Q)),
        "centroid_scores_f32 (groups of 8)": (
            jax.jit(lambda b, Q: native.centroid_scores_f32(b, Q, num_centroids)),
            (blocked, Q),
        ),
        "dense_f32 over centroid rows": (jax.jit(rows), (C, Q)),
        "dense_f32, centroids as panels ([32, P])": (
            jax.jit(lambda p, Q: native.dense_f32(Q, p, num_centroids)),
            (panels, Q),
        ),
        "dense_f32, centroids as panels, transposed": (
            jax.jit(lambda p, Q: native.dense_f32(Q, p, num_centroids).T),
            (panels, Q),
        ),
    }
    title = f"stage 1, {num_centroids:,} centroids ({num_centroids * 512 / 2**20:.0f} MiB)"
    _table(title, 2 * num_centroids * 128 * 32, variants, repeats, calls)


def encoder_chain(repeats: int, rng: np.random.Generator, calls: int = 100) -> None:
    def layer():
        return [jnp.asarray(native.pack_dense_f32(0.05 * rng.standard_normal(s, np.float32))) for s in ENCODER_SHAPES]

    distinct = [layer() for _ in range(6)]
    x = jnp.asarray(rng.standard_normal((32, 384), np.float32))

    @jax.jit
    def chain(x, weights):
        for w_qkv, w_out, w_up, w_down in weights:
            qkv = native.dense_f32(x, w_qkv, 1152)
            h = native.dense_f32(native.dense_f32(qkv[:, :384], w_out, 384), w_up, 1536)
            x = x + 0.1 * native.dense_f32(h, w_down, 384)
        return x

    flops = 2 * 32 * 6 * sum(k * n for k, n in ENCODER_SHAPES)
    variants = {
        "six layers' weights (42 MB)": (chain, (x, distinct)),
        "three layers' weights twice (21 MB)": (chain, (x, distinct[:3] * 2)),
        "one layer's weights six times (7 MB)": (chain, (x, distinct[:1] * 6)),
    }
    _table("encoder's 24 dense products, one query", flops, variants, repeats, calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--centroids", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, help="calls per variant and repeat (default: 30 stage 1, 100 encoder)")
    args = ap.parse_args()
    if not native.enabled():
        raise SystemExit("the native kernels are unavailable here (no C++ compiler, or COLBERT_JAX_NATIVE=0)")
    rng = np.random.default_rng(0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    bits = native.vector_bits()
    print(f"{cpu}, {platform.machine()}, vector bits {bits}, jax {jax.__version__}; {args.repeats} repeats")
    print("| product | variant | ms median (min-max) | fastest call | p25 of calls | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    calls = {} if args.calls is None else {"calls": args.calls}
    for p in args.centroids:
        stage1(p, args.repeats, rng, **calls)
    encoder_chain(args.repeats, rng, **calls)


if __name__ == "__main__":
    main()
