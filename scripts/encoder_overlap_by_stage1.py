"""How much do an encoder's rankings agree with float32 encoding's, by stage 1's operands? For each
COLBERT_JAX_STAGE1 mode, one searcher over INDEX ranks the queries encoded in float32 and with the bf16 query
encoder (`query_quantization="bf16"`) at k=10 and prints the overlap@10 of the two rankings (the encoder bar's
measure in `bench_encoder.py`, with stage 1 fixed).

    python scripts/encoder_overlap_by_stage1.py --index INDEX --queries QUERIES.tsv [--modes f32,bf16,int8]
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="qid \\t text TSV")
    ap.add_argument("--modes", default="f32,bf16,int8", help="COLBERT_JAX_STAGE1 values, comma-separated")
    args = ap.parse_args()
    import colbert_jax
    from colbert_jax.queries import load_queries

    texts = list(load_queries(args.queries).values())
    embeddings = None
    for mode in args.modes.split(","):
        os.environ["COLBERT_JAX_STAGE1"] = mode  # read when the searcher places the index
        searcher = colbert_jax.Searcher(args.index, truncate=True)
        if embeddings is None:
            model = searcher.model
            embeddings = {q: model.replace_config(query_quantization=q).encode_queries(texts) for q in ("none", "bf16")}
        tops = {}
        for name, Q in embeddings.items():
            ranking = searcher.search_all(list(Q), k=10).todict()
            tops[name] = [{p for p, _, _ in ranking[i]} for i in range(len(texts))]
        overlap = np.mean([len(a & b) / 10 for a, b in zip(tops["none"], tops["bf16"])])
        print(f"stage 1 {mode}: overlap@10 of the bf16 encoder's rankings with float32 encoding's {overlap:.4f}")


if __name__ == "__main__":
    main()
