"""Where colbert-jax's CPU search time goes: matmul speed, query encoding, and retrieval alone.

    python scripts/bench_cpu_parts.py --index DIR [--index DIR ...] [--queries 200] [--queries-file TSV]
        [--k 10] [--engine plaid warp] [--repeats 1] [--two-programs]

1. XLA:CPU GFLOP/s of the query encoder's largest product ([32, 384] x [384, 1536], float32 and bfloat16),
   and torch's on the same product when the reference venv is there (--ref-python).
2. The query encoder (packaged MiniLM): ms per single query (32 tokens), tokenisation excluded.
3. For each index: retrieval alone from pre-encoded queries (no encoding): batched queries/s of
   `search_all` (median of 3 passes) and single-query p50 ms, at k=10 (--k) with the defaults, for each --engine
   (run back to back, --repeats times: medians with the min-max spread over repeats). With --two-programs,
   also PLAID's batched retrieval without `plaid.search_fused` (each batch by `cells` + `search_streamed`, as
   before that program), timed back to back with the others.
Indexes from `scripts/bench_search.py` (`DIR/ours`) or `scripts/bench_scale.py` (`ours1`, `ours10`, ...)
fit; queries are drawn from the (first) index's collection as in those benchmarks, or are the first --queries
of --queries-file (`qid \t text`, e.g. the held-out collection's, `make_docstring_collection.py`); --k sets
the retrieval's k. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_search import write_queries  # noqa: E402


def _median_s(fn, n: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_gflops(dtype) -> float:
    a, b = jnp.ones((32, 384), dtype), jnp.ones((384, 1536), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * 32 * 384 * 1536 / _median_s(lambda: f(a, b), 200) / 1e9


TORCH_MATMUL = """
import json, time, numpy as np, torch
a, b = torch.ones(32, 384), torch.ones(384, 1536)
for _ in range(20):
    a @ b
times = []
for _ in range(200):
    t0 = time.perf_counter(); a @ b; times.append(time.perf_counter() - t0)
print(json.dumps(2 * 32 * 384 * 1536 / float(np.median(times)) / 1e9))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", action="append", required=True, help="a colbert-jax index (repeatable)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "/tmp/colbert-ref-venv/bin/python"))
    ap.add_argument("--engine", nargs="+", default=["plaid"], help="search engines to time (plaid, warp)")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds per engine (medians reported)")
    ap.add_argument("--collection", help="TSV the queries are drawn from (default: the first index's own)")
    ap.add_argument("--queries-file", help="TSV of queries (qid, text) to use instead of passage openings")
    ap.add_argument("--k", type=int, default=10, help="results per query in the retrieval timings")
    ap.add_argument("--two-programs", action="store_true", help="also time PLAID batches without search_fused")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    import colbert_jax
    from colbert_jax.default_model import default_checkpoint
    from colbert_jax.queries import load_queries

    checkpoint = str(default_checkpoint())
    work = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    if args.queries_file:
        texts = list(load_queries(Path(args.queries_file)).values())[: args.queries]
    else:
        sources = [colbert_jax.Index.open(i).metadata["collection"]["source"] for i in args.index]
        corpus = args.collection or next((src for src in sources if src), None)
        if corpus is None:
            sys.exit("none of the indexes records its collection: pass --collection (the built-in corpus TSV)")
        write_queries(Path(corpus), work / "queries.tsv", args.queries)
        texts = list(load_queries(work / "queries.tsv").values())

    model = colbert_jax.load_checkpoint(checkpoint)
    ids, mask = model.query_tokenizer.tensorize(texts[:1])
    encode_ms = 1000 * _median_s(lambda: model.encode_query_ids(ids, mask), 100)
    print(f"\n{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.device_count()} device(s)\n")
    print("| part | value |\n|---|---|")
    print(f"| matmul [32,384]x[384,1536] float32 | {matmul_gflops(jnp.float32):.0f} GFLOP/s |")
    print(f"| matmul [32,384]x[384,1536] bfloat16 | {matmul_gflops(jnp.bfloat16):.0f} GFLOP/s |")
    if Path(args.ref_python).exists():  # the same product in torch (colbert-ai's venv), for comparison
        out = subprocess.run([args.ref_python, "-c", TORCH_MATMUL], capture_output=True, text=True, check=True)
        print(f"| matmul [32,384]x[384,1536] float32, torch | {json.loads(out.stdout):.0f} GFLOP/s |")
    print(f"| query encoder, one query | {encode_ms:.2f} ms |")
    report = {"encode_one_query_ms": encode_ms, "k": args.k, "indexes": []}

    for index in args.index:
        searchers = {
            e: colbert_jax.Searcher(index, checkpoint=checkpoint, truncate=True, allow_other_checkpoint=True, engine=e)
            for e in args.engine
        }
        Q = next(iter(searchers.values())).encode(texts)
        pre = dict(enumerate(Q))
        for s in searchers.values():  # compile and load before any timing
            s.search_all(pre, k=args.k)
            for q in Q[:20]:
                s.search(q, k=args.k)
        qps = {e: [] for e in args.engine}
        p50 = {e: [] for e in args.engine}
        two = [] if args.two_programs and "plaid" in searchers else None
        for _ in range(args.repeats):  # engines back to back, so that a noisy spell hits them alike
            if two is not None:
                two.append(len(Q) / _median_s(functools.partial(_two_programs, searchers["plaid"], pre), 3))
            for e, s in searchers.items():
                qps[e].append(len(Q) / _median_s(functools.partial(s.search_all, pre, k=args.k), 3))
                single = []
                for q in Q[:100]:
                    t0 = time.perf_counter()
                    s.search(q, k=args.k)
                    single.append(time.perf_counter() - t0)
                p50[e].append(1000 * float(np.median(single)))
        s = next(iter(searchers.values()))
        for e in args.engine:
            name = f"{Path(index).name} ({s.index.num_embeddings:,} embeddings), {e}, k={args.k}"
            print(f"| retrieval only, {name}, batched | {_spread(qps[e], '.1f')} queries/s |")
            print(f"| retrieval only, {name}, single p50 | {_spread(p50[e], '.2f')} ms |")
            report["indexes"].append(
                {
                    "index": str(index),
                    "embeddings": s.index.num_embeddings,
                    "engine": e,
                    "batched_qps": qps[e],
                    "single_p50_ms": p50[e],
                }
            )
        if two is not None:
            name = f"{Path(index).name} ({s.index.num_embeddings:,} embeddings), plaid without search_fused"
            print(f"| retrieval only, {name}, batched | {_spread(two, '.1f')} queries/s |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _two_programs(searcher, queries):
    """`search_all` at k=10 with no IVF-entry guess recorded: every batch by `cells` + `search_streamed`."""
    engine = searcher._plaid_engine()
    engine._guess_entries = lambda *args, **kwargs: None  # the instance's: the class keeps its own
    engine._entries_guess.clear()
    try:
        return searcher.search_all(queries, k=10)
    finally:
        del engine._guess_entries


def _spread(values: list[float], fmt: str) -> str:
    """The median, and the min-max range when there are several values."""
    median = format(float(np.median(values)), fmt)
    return median if len(values) == 1 else f"{median} ({format(min(values), fmt)}-{format(max(values), fmt)})"


if __name__ == "__main__":
    main()
