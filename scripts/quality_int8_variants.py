"""How precise must int8 query encoding be? Query embeddings and PLAID rankings of cheaper int8 schemes against
float32's, on an index and its queries:

  int8    the shipped two-term encoder: x_hi.w_hi + (x_hi.w_lo + x_lo.w_hi) / 254 (three int8 products)
  w8a16   activations in two terms, weights in one: x_hi.w_hi + x_lo.w_hi / 254 (two products)
  w16a8   activations in one term, weights in two: x_hi.w_hi + x_hi.w_lo / 254 (two products)
  w8a8    one term each: x_hi.w_hi (one product: what a CPU without AMX could run faster than float32)

Issue 14 accepts an int8 encoder only if every query embedding stays within cosine 0.999 of float32's and
PLAID's overlap@10 with float32's rankings is at least 0.99.

    python scripts/quality_int8_variants.py --index INDEX [--queries QUERIES.tsv] [--n 500]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

VARIANTS = ("int8", "w8a16", "w16a8", "w8a8")


def _variant_matmul(name: str):
    """A stand-in for `quantize._int8_matmul` (XLA's int8 path, unpacked params) keeping fewer terms."""
    from colbert_jax.modeling import quantize

    def matmul(x, high, cross, scale):
        x_hi, x_lo, x_scale = quantize._split_rows(x.astype(jnp.float32))
        dims = (((x.ndim - 1,), (0,)), ((), ()))

        def dot(a, b):
            return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.int32).astype(jnp.float32)

        acc = dot(x_hi, high)
        if name == "w8a16":
            acc = acc + dot(x_lo, high) / quantize._LOW_STEPS
        elif name == "w16a8":
            acc = acc + dot(x_hi, cross[: high.shape[0]]) / quantize._LOW_STEPS
        return acc / ((1.0 / x_scale) * (1.0 / scale))

    return matmul


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", help="queries TSV (default: the bench queries of the built-in corpus)")
    ap.add_argument("--n", type=int, default=500, help="bench queries to write when --queries is not given")
    args = ap.parse_args()
    import colbert_jax
    from colbert_jax.modeling import quantize
    from colbert_jax.queries import load_queries

    queries = args.queries
    if queries is None:
        from bench_search import write_queries

        from colbert_jax.quickstart import corpus_file

        queries = Path(tempfile.mkdtemp(prefix="quality-int8-")) / "queries.tsv"
        write_queries(corpus_file(), queries, args.n)
    texts = list(load_queries(queries).values())
    searcher = colbert_jax.Searcher(args.index, truncate=True)
    model = searcher.model
    embeddings = {"float32": model.replace_config(query_quantization="none").encode_queries(texts)}
    shipped = quantize._int8_matmul
    if model.replace_config(query_quantization="int8").int8_products != "xla":
        raise SystemExit("run with COLBERT_JAX_NATIVE=0: the variants replace XLA's int8 path, not the native kernel")
    try:
        for name in VARIANTS:
            quantize._int8_matmul = shipped if name == "int8" else _variant_matmul(name)
            embeddings[name] = model.replace_config(query_quantization="int8").encode_queries(texts)
    finally:
        quantize._int8_matmul = shipped
    from bench_encoder import agreement

    print(f"{args.index}, {len(texts)} queries")
    print("| encoder | int8 products per weight | worst query cosine | mean cosine | PLAID overlap@10 |")
    print("|---|---|---|---|---|")
    products = {"float32": "-", "int8": "3", "w8a16": "2", "w16a8": "2", "w8a8": "1"}
    for name, (cosine, overlap) in agreement(searcher, embeddings).items():
        worst, mean = max(0.0, 1 - float(cosine.min())), max(0.0, 1 - float(cosine.mean()))
        print(f"| {name} | {products[name]} | 1 - {worst:.1e} | 1 - {mean:.1e} | {overlap:.4f} |")


if __name__ == "__main__":
    main()
