"""Stage 6's native kernel (`native.exact_maxsim`) on the vector unit, from the nibble table and on the AMX tile
unit, side by side.

    python scripts/bench_exact_maxsim.py [--docs 256] [--doclen 119] [--nbits 2] [--dim 128] [--repeats 5]

Synthetic candidates: --docs documents of --doclen embeddings each (the held-out collection's long passages
average 119), random codes and packed residuals, 32 query tokens, an index's byte table of bucket weights.
Each implementation runs once per repeat, back to back (compiled first); prints the median ms per call and
ns per candidate embedding (min-max over repeats), and each one's largest difference from "vector". "amx"
needs a CPU with AMX-BF16 (else it does not run).
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from colbert_jax import native  # noqa: E402
from pallas_kernels.decompress import byte_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=256, help="candidate documents (ndocs / 4 at k=100: 256)")
    ap.add_argument("--doclen", type=int, default=119)
    ap.add_argument("--nbits", type=int, default=2, choices=[1, 2, 4])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not native.enabled():
        sys.exit("the native kernels are off or unavailable here")
    rng = np.random.default_rng(0)
    lq, num_centroids = 32, 8192
    rows = args.docs * args.doclen
    Q = rng.standard_normal((lq, args.dim)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    S = rng.standard_normal((num_centroids, lq)).astype(np.float32) * 0.3
    codes = rng.integers(0, num_centroids, rows).astype(np.int32)
    residuals = rng.integers(0, 256, (rows, args.dim * args.nbits // 8)).astype(np.uint8)
    weights = np.sort(rng.standard_normal(1 << args.nbits)).astype(np.float32) * 0.05
    table = np.asarray(byte_table(jax.numpy.asarray(weights), args.nbits))
    inv_norms = np.full(rows, 0.9, np.float32)
    starts = (np.arange(args.docs) * args.doclen).astype(np.int32)
    lens = np.full(args.docs, args.doclen, np.int32)
    operands = (Q, S, codes, residuals, inv_norms, table, starts, lens)
    impls = ["vector", "table"] + (["amx"] if native.amx_bf16_available() else [])
    kernels = {i: jax.jit(functools.partial(native.exact_maxsim, implementation=i)) for i in impls}
    outs = {i: np.asarray(k(*operands)) for i, k in kernels.items()}
    ms: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(args.repeats):
        for i, k in kernels.items():
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                jax.block_until_ready(k(*operands))
                times.append(time.perf_counter() - t0)
            ms[i].append(1000 * float(np.median(times)))
    print(
        f"\n{platform.processor() or platform.machine()}, {jax.device_count()} device(s); {args.docs} documents x "
        f"{args.doclen} embeddings, nbits {args.nbits}, dim {args.dim}\n"
    )
    print("| implementation | ms per call | ns per embedding |\n|---|---|---|")
    for i, values in ms.items():
        med = float(np.median(values))
        ns = [1e6 * v / rows for v in values]
        print(
            f"| {i} | {med:.3f} ({min(values):.3f}-{max(values):.3f}) | {1e6 * med / rows:.1f} "
            f"({min(ns):.1f}-{max(ns):.1f}) |"
        )
    for i in impls[1:]:
        print(f"\nlargest difference {i} - vector: {np.abs(outs[i] - outs['vector']).max():.2e}")


if __name__ == "__main__":
    main()
