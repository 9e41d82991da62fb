"""Stage 1 (one 32-token query's centroid scores and block maxima) through `native.centroid_scores_f32`,
`native.centroid_scores_bf16` and (where built with AVX-512 VNNI) `native.centroid_scores_int8`, as jitted XLA
programs call them, alternated call by call in one process.

    python scripts/bench_stage1_bf16.py [--centroids 65536 8192] [--dim 128] [--lq 32] [--calls 60] [--repeats 3]

Each repeat prints each kernel's median call (ms) and the ratios of the medians to float32's; the last lines give
the median over repeats and their spread (min-max). Threads: the XLA:CPU pool's (run under `taskset -c 0` for one core).
Needs a CPU with AVX-512 BF16 (`native.avx512_bf16_available()`).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from colbert_jax import native


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--centroids", type=int, nargs="+", default=[65536, 8192])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--lq", type=int, default=32)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not native.avx512_bf16_available():
        raise SystemExit("no AVX-512 BF16 here (native.avx512_bf16_available() is False)")
    cores = len(os.sched_getaffinity(0))
    rng = np.random.default_rng(0)
    for p in args.centroids:
        C, Q = _unit(rng, p, args.dim), jnp.asarray(_unit(rng, args.lq, args.dim))
        kernels = {
            "f32": (
                jax.jit(functools.partial(native.centroid_scores_f32, num_centroids=p, block_maxima=True)),
                jnp.asarray(native.block_centroids(C)),
            ),
            "bf16": (
                jax.jit(functools.partial(native.centroid_scores_bf16, num_centroids=p, block_maxima=True)),
                jnp.asarray(native.block_centroids_bf16(C)),
            ),
        }
        if native.stage1_int8_available():
            packed, terms = (jnp.asarray(x) for x in native.block_centroids_int8(C))
            int8 = jax.jit(functools.partial(native.centroid_scores_int8, num_centroids=p, block_maxima=True))
            kernels["int8"] = (lambda c, Q, int8=int8, terms=terms: int8(c, terms, Q), packed)
        S = {name: np.asarray(fn(c, Q)[0]) for name, (fn, c) in kernels.items()}
        diffs = ", ".join(f"max |S_{n} - S_f32| {np.abs(S[n] - S['f32']).max():.2e}" for n in kernels if n != "f32")
        print(f"P={p} dim={args.dim} Lq={args.lq} cores={cores}: {diffs}")
        medians: dict[str, list[float]] = {name: [] for name in kernels}
        for r in range(args.repeats):
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(args.calls):
                for name, (fn, c) in kernels.items():
                    t = time.perf_counter()
                    jax.block_until_ready(fn(c, Q))
                    times[name].append(time.perf_counter() - t)
            for name in kernels:
                medians[name].append(statistics.median(times[name]) * 1e3)
            line = ", ".join(f"{n} {medians[n][-1]:.3f} ms" for n in kernels)
            ratios = ", ".join(f"f32/{n} {medians['f32'][-1] / medians[n][-1]:.2f}x" for n in kernels if n != "f32")
            print(f"  repeat {r}: {line}, {ratios}")
        for name in kernels:
            m = medians[name]
            print(f"  {name}: median {statistics.median(m):.3f} ms (spread {min(m):.3f}-{max(m):.3f})")
        for name in (n for n in kernels if n != "f32"):
            ratios = [f / b for f, b in zip(medians["f32"], medians[name])]
            print(f"  f32/{name}: median {statistics.median(ratios):.2f}x (spread {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
