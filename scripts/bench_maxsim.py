"""Stage 6's native kernel alone (`colbert_jax.native.exact_maxsim`): time and GFLOP/s of one call on a random
problem the size of a single query's candidates at 1x (1,024 documents, about 40,000 rows, 32 query tokens,
dim 128, nbits 2), median of 20 calls after a warm-up.

    python scripts/bench_maxsim.py [--docs 1024] [--calls 20]

Reports which vector width the kernels were built for (`native.vector_bits()`: 512 AVX-512, 256 AVX2).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from colbert_jax import native
from pallas_kernels.decompress import byte_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    if not native.enabled():
        raise SystemExit("the native kernels are off or unavailable")
    rng = np.random.default_rng(0)
    rows, partitions, lq, dim, nbits = 165_000, 4096, 32, 128, 2
    codes = jnp.asarray(rng.integers(0, partitions, rows).astype(np.int32))
    residuals = jnp.asarray(rng.integers(0, 256, (rows, dim * nbits // 8)).astype(np.uint8))
    inv_norms = jnp.asarray(rng.random(rows).astype(np.float32))
    Q = jnp.asarray(rng.standard_normal((lq, dim)).astype(np.float32))
    S = jnp.asarray(rng.standard_normal((partitions, lq)).astype(np.float32))
    weights = jnp.asarray(np.linspace(-1, 1, 1 << nbits).astype(np.float32))
    table = byte_table(weights, nbits).astype(jnp.float32)
    lens = rng.integers(20, 60, args.docs).astype(np.int32)
    starts = rng.integers(0, rows - 60, args.docs).astype(np.int32)
    fn = jax.jit(native.exact_maxsim)
    call = (Q, S, codes, residuals, inv_norms, table, jnp.asarray(starts), jnp.asarray(lens))
    fn(*call).block_until_ready()
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        fn(*call).block_until_ready()
        times.append(time.perf_counter() - t)
    seconds = float(np.median(times))
    flops = int(lens.sum()) * lq * dim * 2
    print(
        f"{platform.processor() or platform.machine()}, kernels built for {native.vector_bits()}-bit vectors: "
        f"{args.docs} documents, {int(lens.sum())} rows: {1000 * seconds:.2f} ms "
        f"({min(times) * 1000:.2f}-{max(times) * 1000:.2f}), {flops / seconds / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
