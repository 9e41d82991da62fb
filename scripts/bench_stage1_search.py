"""Batched search (`search_all`) with stage 1 on different operands, side by side in one process: one searcher
per COLBERT_JAX_STAGE1 mode over the same index, passes alternated (the order reversed every other round), each
pass all the queries at k. Prints each mode's median queries/s and its spread (min-max).

    python scripts/bench_stage1_search.py --index INDEX --queries QUERIES.tsv [--k 10] [--rounds 10]
        [--modes bf16,int8]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="qid \\t text TSV")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--modes", default="bf16,int8", help="COLBERT_JAX_STAGE1 values, comma-separated")
    args = ap.parse_args()
    import colbert_jax
    from colbert_jax.queries import load_queries

    queries = load_queries(args.queries)
    modes = args.modes.split(",")
    searchers = {}
    for mode in modes:
        os.environ["COLBERT_JAX_STAGE1"] = mode  # read when the searcher places the index
        searchers[mode] = colbert_jax.Searcher(args.index, truncate=True)
        for _ in range(2):  # compile and warm
            searchers[mode].search_all(queries, k=args.k)
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            t = time.perf_counter()
            searchers[mode].search_all(queries, k=args.k)
            rates[mode].append(len(queries) / (time.perf_counter() - t))
    for mode in modes:
        v = np.array(rates[mode])
        print(f"stage 1 {mode}: {np.median(v):.1f} queries/s (min {v.min():.1f}, max {v.max():.1f}), k={args.k}")


if __name__ == "__main__":
    main()
