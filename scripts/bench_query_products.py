"""The query encoder's products side by side in one process: for each `query_quantization` (default bf16, int16,
int8), batched encoding (all queries in batches of 64) and one query at a time, and, with --index, batched
search (`search_all` at --k) through a searcher with that setting. Rounds alternate the encoders (the order
reversed every other round), so that a noisy machine slows them alike. Prints medians and spreads (min-max).

    python scripts/bench_query_products.py --queries QUERIES.tsv [--index INDEX] [--k 10] [--rounds 8]
        [--encoders bf16,int16,int8] [--single 20]

With --kernels, first the dense kernels alone on the encoder's batched shapes ([2048, K] x [K, N], MiniLM's
four), bf16 against int16, alternated call by call (GFLOP/s, medians of --calls).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def _kernels(calls: int) -> None:
    import jax
    import jax.numpy as jnp

    from colbert_jax import native

    rng = np.random.default_rng(0)
    print("| shape | bf16 GFLOP/s | int16 GFLOP/s | int16 / bf16 |")
    print("|---|---|---|---|")
    for m, k, n in ((2048, 384, 1152), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (32, 384, 1536)):
        x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        packed16, scales = native.pack_dense_int16(w)
        packed_bf16 = native.pack_dense_bf16(w)
        fns = {
            "bf16": jax.jit(lambda x, p=packed_bf16, n=n: native.dense_bf16(x, p, n)),
            "int16": jax.jit(lambda x, p=packed16, s=scales, n=n: native.dense_int16(x, p, s, n)),
        }
        for f in fns.values():
            f(x).block_until_ready()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(calls):
            for name, f in fns.items():
                t = time.perf_counter()
                f(x).block_until_ready()
                times[name].append(time.perf_counter() - t)
        rate = {name: 2 * m * k * n / float(np.median(v)) / 1e9 for name, v in times.items()}
        ratio = rate["int16"] / rate["bf16"]
        print(f"| [{m}, {k}] x [{k}, {n}] | {rate['bf16']:.0f} | {rate['int16']:.0f} | {ratio:.2f} |")


def _spread(values: list[float], fmt: str = "{:.3f}") -> str:
    v = np.asarray(values)
    return f"{fmt.format(np.median(v))} ({fmt.format(v.min())}-{fmt.format(v.max())})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", required=True, help="qid \\t text TSV")
    ap.add_argument("--index", help="also time batched search over this index")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--single", type=int, default=20, help="queries encoded one at a time per round")
    ap.add_argument("--encoders", default="bf16,int16,int8", help="query_quantization values, comma-separated")
    ap.add_argument("--kernels", action="store_true", help="first the bf16 and int16 dense kernels alone")
    ap.add_argument("--calls", type=int, default=60, help="--kernels: calls per kernel and shape")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*truncated.*")
    import colbert_jax
    from colbert_jax.default_model import default_checkpoint
    from colbert_jax.queries import load_queries

    if args.kernels:
        _kernels(args.calls)
    texts = list(load_queries(args.queries).values())
    names = args.encoders.split(",")
    if args.index:
        searchers = {q: colbert_jax.Searcher(args.index, truncate=True, query_quantization=q) for q in names}
        models = {q: s.model for q, s in searchers.items()}
    else:
        base = colbert_jax.load_checkpoint(default_checkpoint())
        searchers, models = {}, {q: base.replace_config(query_quantization=q) for q in names}
    for q, model in models.items():  # compile every shape used below
        assert model.query_quantization == q, (q, model.query_quantization)
        model.encode_queries(texts, bsize=64)
        model.encode_queries(texts[:1])
        if q in searchers:
            searchers[q].search_all(texts, k=args.k)
    batched: dict[str, list[float]] = {q: [] for q in names}
    single: dict[str, list[float]] = {q: [] for q in names}
    search: dict[str, list[float]] = {q: [] for q in names}
    for r in range(args.rounds):
        for q in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            models[q].encode_queries(texts, bsize=64)
            batched[q].append((time.perf_counter() - t) / len(texts) * 1e3)
            for text in texts[: args.single]:
                t = time.perf_counter()
                models[q].encode_queries([text])
                single[q].append((time.perf_counter() - t) * 1e3)
            if q in searchers:
                t = time.perf_counter()
                searchers[q].search_all(texts, k=args.k)
                search[q].append(len(texts) / (time.perf_counter() - t))
    print(
        f"{len(texts)} queries, {args.rounds} rounds alternated"
        + (f"; search k={args.k} on {args.index}" if searchers else "")
    )
    print("| encoder | batched ms/query | single query p50 ms | batched search queries/s |")
    print("|---|---|---|---|")
    for q in names:
        found = _spread(search[q], "{:.1f}") if search[q] else ""
        print(f"| {q} | {_spread(batched[q])} | {np.median(single[q]):.2f} | {found} |")


if __name__ == "__main__":
    main()
