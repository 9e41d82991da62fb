"""PLAID's native CPU stages alone, on a real index and real queries: stages 4-5 (`native.centroid_interaction`,
the centroid-interaction scores of stage 2's candidates, pruned at threshold 0.5) and stage 6
(`native.exact_maxsim`, the exact MaxSim of up to --docs candidates: on the vector unit, and as search runs it:
`implementation="auto"`, q . c recomputed in float32 for the documents' distinct centroids).

    python scripts/bench_native_stages.py --index DIR [--queries 40] [--ncells 2] [--docs 1024] [--repeats 5]

Queries are the first --queries of `DIR/../queries.tsv` (bench_scale's work dir) or of --queries-file; each
query's candidates are the passages of the IVF lists of its --ncells best centroids per token, as stage 2 takes
them. Prints ms per query for each stage: the median (min-max) over --repeats passes through all the queries.
Before/after comparisons: run it from a worktree of the other commit with that worktree on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import colbert_jax
from colbert_jax import native
from colbert_jax.queries import load_queries
from pallas_kernels.decompress import byte_table


def _candidates(S: np.ndarray, ivf: np.ndarray, offsets: np.ndarray, ncells: int) -> np.ndarray:
    """Sorted passage positions in the IVF lists of each token's `ncells` best centroids."""
    cells = np.unique(np.argsort(-S, axis=0)[:ncells].ravel())
    return np.unique(np.concatenate([ivf[offsets[c] : offsets[c + 1]] for c in cells]))


def _ms_per_query(fn, cases, repeats: int) -> list[float]:
    for case in cases:  # compile every padded shape first
        jax.block_until_ready(fn(*case))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for case in cases:
            jax.block_until_ready(fn(*case))
        times.append(1000 * (time.perf_counter() - t0) / len(cases))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="a colbert-jax index (e.g. bench_scale's ours100)")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--queries-file", help="TSV of queries (default: the index's parent dir's queries.tsv)")
    ap.add_argument("--ncells", type=int, default=2, help="centroids per query token whose lists are candidates")
    ap.add_argument("--docs", type=int, default=1024, help="candidates per query in stage 6")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not native.enabled():
        raise SystemExit("the native CPU kernels are off or unavailable here: nothing to time")

    searcher = colbert_jax.Searcher(args.index, truncate=True, allow_other_checkpoint=True, engine="plaid")
    a = searcher.arrays
    queries_file = args.queries_file or str(Path(args.index).resolve().parent / "queries.tsv")
    texts = list(load_queries(queries_file).values())[: args.queries]
    Q = np.asarray(searcher.encode(texts))
    centroids = np.asarray(a.centroids)
    ivf, ivf_offsets = np.asarray(a.ivf[0]), np.asarray(a.ivf_offsets[0])
    offsets, doclens = np.asarray(a.offsets[0]), np.asarray(a.doclens[0])
    nbits = int(np.log2(a.bucket_weights.shape[0]))
    table = byte_table(a.bucket_weights, nbits)
    codes, residuals, inv_norms = a.codes[0], a.residuals[0], a.inv_norms[0]

    interaction = jax.jit(lambda S, st, ln: native.centroid_interaction(S, codes, jnp.float32(0.5), st, ln))
    maxsim = jax.jit(
        lambda q, S, st, ln: native.exact_maxsim(
            q, S, codes, residuals, inv_norms, table, st, ln, implementation="vector"
        )
    )
    centroids_device = jnp.asarray(centroids)
    searched = jax.jit(
        lambda q, S, st, ln: native.exact_maxsim(
            q, S, codes, residuals, inv_norms, table, st, ln, centroids=centroids_device, implementation="auto"
        )
    )
    stage45, stage6, counts, docs = [], [], [], []
    for q in Q:
        S = centroids @ q.T
        cand = _candidates(S, ivf, ivf_offsets, args.ncells)
        counts.append(len(cand))
        padded = np.full(1 << int(np.ceil(np.log2(len(cand)))), doclens.shape[0] - 1, np.int32)  # the sentinel
        padded[: len(cand)] = cand
        S = jnp.asarray(S, jnp.float32)
        stage45.append((S, jnp.asarray(offsets[padded]), jnp.asarray(doclens[padded])))
        top = cand[: args.docs]
        docs.append(len(top))
        stage6.append((jnp.asarray(q), S, jnp.asarray(offsets[top]), jnp.asarray(doclens[top])))

    print(
        f"\n{platform.processor() or platform.machine()}, jax {jax.__version__}, {len(Q)} queries, nbits {nbits}, "
        f"{searcher.index.num_embeddings:,} embeddings, {centroids.shape[0]:,} centroids\n"
    )
    print("| stage | work per query | ms per query, median (min-max) |\n|---|---|---|")
    for name, work, fn, cases in (
        ("4-5, centroid interaction", f"{int(np.mean(counts)):,} candidates", interaction, stage45),
        ("6, exact MaxSim (vector unit)", f"{int(np.mean(docs)):,} documents", maxsim, stage6),
        ("6, as search runs it (auto, centroids refined)", f"{int(np.mean(docs)):,} documents", searched, stage6),
    ):
        t = _ms_per_query(fn, cases, args.repeats)
        print(f"| {name} | {work} | {np.median(t):.3f} ({min(t):.3f}-{max(t):.3f}) |")


if __name__ == "__main__":
    main()
