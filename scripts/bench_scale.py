"""How search speed grows with collection size: colbert-jax vs colbert-ai at 1x, 10x and 100x the built-in
corpus, on identical compressed indexes.

    python scripts/bench_scale.py --base-index DIR [--factors 1 10 100] [--queries 200] [--work DIR]
        [--engine plaid warp plaid@f32] [--repeats 1] [--build-only]

DIR is our nbits=2 index of the built-in corpus (scripts/bench_search.py builds one; so does
`colbert-jax index`). A synthetic x-F collection copies every passage F times; copy c's codes move to
variant (c mod V) of their centroid, a renormalised perturbation (sigma 0.02 per dimension) of it, with
V chosen so that the partition count grows as PLAID's formula would (V = 4 at 10x: 16,384 partitions;
16 at 100x: 65,536). Residuals are kept. The same arrays are written as a colbert-jax index and, by
colbert-ai's own classes, as a colbert-ai index; both systems encode the same query texts with the same
checkpoint and search at k=10 with their defaults (median of 3 batched passes after a warm-up, then
single-query p50).

--work DIR keeps the synthetic indexes (oursF/, refF/) and the queries there and reuses them on later runs
(building the 100x pair takes most of a run); `DIR/READY` is touched once oursF exists for every factor.
--engine runs our Searcher once per engine, back to back with the reference, --repeats times each (the
machine may be shared and noisy: the table shows medians and the min-max spread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_index import run  # noqa: E402
from bench_search import write_queries  # noqa: E402

OURS = """
import json, sys, time
import numpy as np
import colbert_jax
from colbert_jax.queries import load_queries
index, queries_path, checkpoint, variant = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
engine, _, quantization = variant.partition("+")  # e.g. "plaid+int8": int8 query encoding
settings = {"query_quantization": quantization} if quantization else {}
queries = load_queries(queries_path)
s = colbert_jax.Searcher(index, checkpoint=checkpoint, truncate=True, allow_other_checkpoint=True, engine=engine,
                         **settings)
s.search_all(queries, k=10)
for q in list(queries.values())[:100]:
    s.search(q, k=10)
times = []
for _ in range(3):
    t0 = time.perf_counter(); s.search_all(queries, k=10); times.append(time.perf_counter() - t0)
lat = []
for q in list(queries.values())[:100]:
    t0 = time.perf_counter(); s.search(q, k=10); lat.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({"batched_qps": len(queries) / float(np.median(times)),
                              "single_p50_ms": 1000 * float(np.median(lat))}))
"""


def synthesize(base, factor: int, variants: int, out: Path, arrays: Path, seed: int = 0) -> tuple[int, int, int]:
    from colbert_jax.index import write_index
    from colbert_jax.indexing.codec import ResidualCodec

    rng = np.random.default_rng(seed)
    c = base.codec.centroids
    noisy = c[None] + rng.normal(0, 0.02, (variants, *c.shape)).astype(np.float32) if variants > 1 else c[None]
    noisy = noisy / np.linalg.norm(noisy, axis=-1, keepdims=True)
    centroids = noisy.reshape(-1, c.shape[1]).astype(np.float16)
    codec = ResidualCodec(
        centroids.astype(np.float32), base.codec.bucket_cutoffs, base.codec.bucket_weights, base.nbits
    )
    P = base.num_partitions
    codes = np.concatenate([base.codes + (copy % variants) * P for copy in range(factor)]).astype(np.int32)
    residuals = np.tile(base.residuals, (factor, 1))
    doclens = np.tile(base.doclens, factor)
    arrays.mkdir(parents=True, exist_ok=True)
    for name, value in (
        ("centroids", centroids),
        ("cutoffs", codec.bucket_cutoffs),
        ("weights", codec.bucket_weights),
        ("codes", codes),
        ("residuals", residuals),
        ("doclens", doclens),
    ):
        np.save(arrays / f"{name}.npy", value)
    write_index(
        out,
        config=base.config,
        codec=codec,
        chunks=[(codes, residuals, doclens)],
        num_embeddings=len(codes),
        pids=np.arange(len(doclens), dtype=np.int64),
        checkpoint=base.metadata["checkpoint"],
        collection={"source": None, "fingerprint": None},
        build={"synthetic": f"{factor}x"},
    )
    return len(doclens), len(codes), len(centroids)


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{float(np.median(values)):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-index", required=True)
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "/tmp/colbert-ref-venv/bin/python"))
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--work", help="keep and reuse the synthetic indexes in this directory")
    ap.add_argument(
        "--engine",
        nargs="+",
        default=["plaid"],
        help="our engines (plaid, warp; ENGINE+int8: with int8 query encoding; ENGINE@f32 or ENGINE@bf16: stage 1's "
        "precision, COLBERT_JAX_STAGE1)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs of each system per factor (medians reported)")
    ap.add_argument("--build-only", action="store_true", help="only build the indexes (with --work)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import colbert_jax
    from colbert_jax.default_model import default_checkpoint

    base = colbert_jax.Index.open(args.base_index)
    checkpoint = str(default_checkpoint())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    queries = work / "queries.tsv"
    if not queries.exists():
        write_queries(Path(base.metadata["collection"]["source"]), queries, args.queries)
    env = {"PYTHONPATH": str(REPO)}
    rows = []
    for factor in args.factors:
        variants = {1: 1, 10: 4, 100: 16}.get(factor, max(1, int(round(np.sqrt(factor) * 1.3))))
        ours, arrays, ref = work / f"ours{factor}", work / f"arrays{factor}", work / f"ref{factor}"
        if not (ours / "metadata.json").exists():
            synthesize(base, factor, variants, ours, arrays)
        if not args.skip_reference and not (ref / "DONE").exists():
            if not (arrays / "codes.npy").exists():  # ours was kept from an earlier run: the arrays were not
                synthesize(base, factor, variants, work / f"tmp-ours{factor}", arrays)
                shutil.rmtree(work / f"tmp-ours{factor}")
            run(
                [
                    args.ref_python,
                    str(REPO / "scripts/reference/ref_write_index.py"),
                    "--arrays",
                    str(arrays),
                    "--index",
                    str(ref),
                    "--checkpoint",
                    checkpoint,
                ]
            )
            (ref / "DONE").touch()
        shutil.rmtree(arrays, ignore_errors=True)
        if args.build_only:
            continue
        index = colbert_jax.Index.open(ours)
        row = {
            "factor": factor,
            "passages": index.num_passages,
            "embeddings": index.num_embeddings,
            "partitions": index.num_partitions,
        }
        n = index.num_passages
        for _ in range(args.repeats):  # every system back to back, so that a noisy spell hits them alike
            for engine in args.engine:
                variant, _, stage1 = engine.partition("@")  # "plaid@f32": COLBERT_JAX_STAGE1=f32 for this run
                extra = {"COLBERT_JAX_STAGE1": stage1} if stage1 else {}
                r = run(
                    [sys.executable, "-c", OURS, str(ours), str(queries), checkpoint, variant], env={**env, **extra}
                )
                row.setdefault(engine, []).append(r)
            if not args.skip_reference:
                collection = work / f"collection{factor}.tsv"
                if not collection.exists():
                    collection.write_text("".join(f"{i}\tpassage {i}\n" for i in range(n)))
                r = run(
                    [
                        args.ref_python,
                        str(REPO / "scripts/reference/ref_search.py"),
                        "--index",
                        str(ref),
                        "--checkpoint",
                        checkpoint,
                        "--collection",
                        str(collection),
                        "--queries",
                        str(queries),
                        "--ks",
                        "10",
                        "--single",
                        "100",
                    ]
                )
                row.setdefault("colbert-ai", []).append(
                    {"batched_qps": r["batched_qps"]["10"], "single_p50_ms": r["single_ms"]["10"]["p50"]}
                )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    if all((work / f"ours{f}" / "metadata.json").exists() for f in args.factors):
        (work / "READY").touch()
    if args.build_only:
        return
    print(f"\nk=10, {args.queries} queries, {os.cpu_count()} CPUs, {args.repeats} run(s) each: median (min-max)\n")
    print(
        "| scale | passages | embeddings | partitions | engine | ours q/s | colbert-ai q/s | ratio | ours p50 ms | "
        "colbert-ai p50 ms | latency ratio |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        ref = r.get("colbert-ai", [])
        ref_qps = [x["batched_qps"] for x in ref]
        ref_ms = [x["single_p50_ms"] for x in ref]
        for engine in args.engine:
            qps = [x["batched_qps"] for x in r[engine]]
            ms = [x["single_p50_ms"] for x in r[engine]]
            ratio = float(np.median(qps)) / float(np.median(ref_qps)) if ref else float("nan")
            lat = float(np.median(ms)) / float(np.median(ref_ms)) if ref else float("nan")
            print(
                f"| {r['factor']}x | {r['passages']:,} | {r['embeddings']:,} | {r['partitions']:,} | {engine} | "
                f"{_spread(qps)} | {_spread(ref_qps) if ref else '-'} | {ratio:.2f} | {_spread(ms)} | "
                f"{_spread(ref_ms) if ref else '-'} | {lat:.2f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
