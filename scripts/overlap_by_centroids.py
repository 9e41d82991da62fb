"""How much of PLAID's overlap with exact search is k-means luck: our index of the built-in corpus built with
several k-means seeds, with colbert-ai's centroids, and colbert-ai's own index imported, on the queries of
scripts/bench_search.py.

    python scripts/overlap_by_centroids.py --ref-index DIR [--seeds 123 1 2 3] [--nbits 2] [--queries 500]

DIR is a colbert-ai index of the built-in corpus (scripts/bench_search.py or
scripts/reference/ref_index.py builds one). Every variant is searched by colbert-jax at k=10 with the
defaults; overlap@10 is against exact MaxSim over the uncompressed embeddings. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_index import write_builtin_collection  # noqa: E402
from bench_search import exact_top10, overlap, write_queries  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-index", required=True, help="colbert-ai index of the built-in corpus")
    ap.add_argument("--seeds", type=int, nargs="+", default=[123, 1, 2, 3], help="k-means seeds (123: default)")
    ap.add_argument("--nbits", type=int, default=2)
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()

    import colbert_jax
    from colbert_jax.default_model import default_checkpoint
    from colbert_jax.indexing import kmeans
    from colbert_jax.queries import load_queries

    work = Path(tempfile.mkdtemp(prefix="overlap-centroids-"))
    collection, queries_path = work / "stdlib.tsv", work / "queries.tsv"
    write_builtin_collection(collection)
    write_queries(collection, queries_path, args.queries)
    checkpoint = str(default_checkpoint())
    exact = exact_top10(checkpoint, collection, queries_path)
    queries = load_queries(queries_path)
    model = colbert_jax.load_checkpoint(checkpoint)

    def measure(index: Path) -> float:
        ranking = colbert_jax.Searcher(index, model, truncate=True).search_all(queries, k=10)
        return overlap({str(q): [p for p, _, _ in ranking[q][:10]] for q in queries}, exact)

    rows = []
    train_centroids = kmeans.train_centroids
    for seed in args.seeds:
        # The indexer has no seed setting (it uses colbert-ai's); this experiment swaps it in.
        kmeans.train_centroids = functools.partial(train_centroids, seed=seed)
        try:
            colbert_jax.Indexer(model, nbits=args.nbits, show_progress=False).index(work / f"seed{seed}", collection)
        finally:
            kmeans.train_centroids = train_centroids
        rows.append((f"colbert-jax index, k-means seed {seed}", measure(work / f"seed{seed}")))
    colbert_jax.Indexer(model, nbits=args.nbits, centroids=args.ref_index, show_progress=False).index(
        work / "ref-centroids", collection
    )
    rows.append(("colbert-jax index with colbert-ai's centroids", measure(work / "ref-centroids")))
    colbert_jax.import_colbert_index(args.ref_index, work / "imported", checkpoint=checkpoint)
    rows.append(("colbert-ai's index, imported", measure(work / "imported")))

    print(f"\nbuilt-in corpus, {len(queries)} queries, nbits={args.nbits}, k=10 defaults\n")
    print("| index searched by colbert-jax | overlap@10 with exact search |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
