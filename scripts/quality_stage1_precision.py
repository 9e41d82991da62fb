"""Would a cheaper stage 1 keep PLAID's quality? Rankings with the centroid scores S = C . Q^T computed from
bfloat16-rounded centroids and query tokens (one bfloat16 product: what `vdpbf16ps` or AMX-BF16 would run at
twice float32's rate or more), against float32's S and exact MaxSim:

  float32        S in float32 (the shipped path)
  bf16           S from bfloat16 operands, used by stages 1-5 and for stage 6's q . c
  bf16+exact-qc  S from bfloat16 operands for stages 1-5; stage 6 recomputes q . c in float32 from the
                 survivors' centroid rows (as it does for rows read from disk)
  int8+exact-qc  S from int8 operands (each centroid and each query token scaled so that its largest
                 magnitude is 127, rounded to nearest; what AVX-512 VNNI's `vpdpbusd` runs at twice bfloat16's
                 rate) for stages 1-5; stage 6 as bf16+exact-qc
  int8-f16+exact-qc  int8+exact-qc with S rounded to float16 (as `centroid_scores_int8` keeps it: half the
                 bytes)

Each variant runs in its own process with the native kernels off (XLA's paths, patched), at k=10 and k=100
with the default search parameters. Prints overlap@10 with exact MaxSim's top 10 and with float32 PLAID's.
--no-exact skips exact MaxSim (it holds the decompressed index in memory: too much for 100x scale on 24 GiB);
a variant's overlap with exact then differs from float32's by at most 1 - its overlap with float32 PLAID.

    python scripts/quality_stage1_precision.py --index INDEX --queries QUERIES.tsv [--n 200] [--no-exact]
        [--variants int8+exact-qc int8-f16+exact-qc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("float32", "bf16", "bf16+exact-qc", "int8+exact-qc", "int8-f16+exact-qc")


def _patch(variant: str) -> None:
    """Swap stage 1's product (and, for bf16+exact-qc, stage 6's use of S) before anything is traced."""
    import jax
    import jax.numpy as jnp

    from colbert_jax.search import candidates, exact_scoring

    if variant == "float32":
        return

    def bf16_scores(Q, a, query_maxlen):
        round16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
        S = jnp.dot(round16(a.centroids), round16(Q[:query_maxlen]).T, precision=jax.lax.Precision.HIGHEST)
        return S, None

    def int8_scores(Q, a, query_maxlen):
        def quantize(x):
            scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True), 1e-30) / 127.0
            return jnp.round(x / scale), scale

        c8, c_scale = quantize(a.centroids)
        q8, q_scale = quantize(Q[:query_maxlen])
        dots = jnp.dot(c8, q8.T, precision=jax.lax.Precision.HIGHEST)  # integers below 2^24: exact in float32
        S = dots * c_scale * q_scale.T
        return (S.astype(jnp.float16) if "f16" in variant else S), None

    candidates.centroid_scores_and_maxima = int8_scores if variant.startswith("int8") else bf16_scores
    if variant.endswith("+exact-qc"):
        similarities = exact_scoring.similarities
        exact_scoring.similarities = lambda Q, S, emb, valid, a, table: similarities(Q, None, emb, valid, a, table)


def run_variant(variant: str, index: str, queries: list[str], out: Path, exact: bool) -> None:
    _patch(variant)
    import colbert_jax

    searcher = colbert_jax.Searcher(index, truncate=True)
    Q = searcher.model.replace_config(query_quantization="none").encode_queries(queries)
    result = {}
    for k in (10, 100):
        ranking = searcher.search_all({i: Q[i] for i in range(len(Q))}, k=k)
        result[f"plaid@{k}"] = [[p for p, _, _ in ranking[i]][:10] for i in range(len(Q))]
    if variant == "float32" and exact:
        ranking = searcher.search_all({i: Q[i] for i in range(len(Q))}, k=10, exact=True)
        result["exact"] = [[p for p, _, _ in ranking[i]] for i in range(len(Q))]
    out.write_text(json.dumps(result))


def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(len(set(x[:10]) & set(y[:10])) / 10 for x, y in zip(a, b)) / len(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="qid \\t text TSV")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--no-exact", action="store_true", help="skip exact MaxSim")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="float32 always runs")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    texts = [line.split("\t")[1] for line in Path(args.queries).read_text().splitlines()[: args.n]]
    if args.variant:
        run_variant(args.variant, args.index, texts, Path(args.out), not args.no_exact)
        return
    work = Path(tempfile.mkdtemp(prefix="stage1-precision-"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "COLBERT_JAX_NATIVE": "0"}
    results = {}
    for variant in ["float32", *(v for v in args.variants if v != "float32")]:
        out = work / f"{variant}.json"
        cmd = [sys.executable, __file__, "--index", args.index, "--queries", args.queries, "--n", str(args.n)]
        cmd += ["--no-exact"] if args.no_exact else []
        subprocess.run([*cmd, "--variant", variant, "--out", str(out)], check=True, env=env)
        results[variant] = json.loads(out.read_text())
    exact = results["float32"].get("exact")
    print(f"{args.index}, {args.n} queries; overlap@10 with exact MaxSim | with float32 PLAID")
    print("| stage 1 | k=10: exact | k=10: float32 PLAID | k=100: exact | k=100: float32 PLAID |")
    print("|---|---|---|---|---|")
    for variant, r in results.items():
        refs = [(k, ref) for k in (10, 100) for ref in (exact, results["float32"][f"plaid@{k}"])]
        cells = [f"{overlap(r[f'plaid@{k}'], ref):.4f}" if ref else "-" for k, ref in refs]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
