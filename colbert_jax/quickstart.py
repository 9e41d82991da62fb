"""Quickstart: the default model (packaged all-MiniLM-L6-v2 + ColBERT head) on a built-in corpus.

    python -m colbert_jax.quickstart [--checkpoint DIR_OR_HUB_ID] [--k 5] [QUERY ...]

Encodes the standard library's docstrings (about 3,900 passages), then answers sample queries with
exact MaxSim (every query token against every document token).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

SAMPLE_QUERIES = [
    "compute the greatest common divisor of two integers",
    "parse a JSON document from a string",
    "create a temporary directory",
    "get the current working directory",
    "push an item onto a heap",
    "copy the contents of a file to another file",
]


def exact_scores(Q: np.ndarray, flat: np.ndarray, doclens: np.ndarray) -> np.ndarray:
    """MaxSim of one query [Lq, dim] against flattened documents -> [n_docs]."""
    sim = flat @ Q.T  # [n_emb, Lq]
    starts = np.concatenate([[0], np.cumsum(doclens)[:-1]])
    return np.maximum.reduceat(sim, starts, axis=0).sum(axis=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="colbert-jax quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("queries", nargs="*", help="queries to answer (default: a few samples)")
    ap.add_argument("--checkpoint", help="ColBERT checkpoint directory or Hub id (default: packaged MiniLM)")
    ap.add_argument("--k", type=int, default=5, help="results per query")
    args = ap.parse_args(argv)

    import colbert_jax
    from colbert_jax.data.stdlib_corpus import stdlib_passages
    from colbert_jax.default_model import default_checkpoint

    t0 = time.perf_counter()
    model = colbert_jax.load_checkpoint(args.checkpoint or default_checkpoint())
    passages = stdlib_passages()
    texts = [f"{title} | {text}" for title, text in passages]
    print(f"model: {model}\ncorpus: {len(texts)} standard-library docstrings  ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    flat, doclens = model.encode_docs_flat(texts)
    dt = time.perf_counter() - t0
    print(f"encoded {len(texts)} passages, {len(flat)} token vectors in {dt:.1f}s ({len(texts) / dt:.0f} passages/s)")

    queries = args.queries or SAMPLE_QUERIES
    for query in queries:
        t0 = time.perf_counter()
        Q = model.encode_queries([query])[0]
        scores = exact_scores(Q, flat, doclens)
        top = np.argsort(-scores)[: args.k]
        print(f"\nQ: {query}   ({(time.perf_counter() - t0) * 1000:.0f} ms)")
        for rank, pid in enumerate(top, 1):
            print(f"  {rank}. [{scores[pid]:6.2f}] {texts[pid][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
