"""Peak memory and speed of search with the index in memory vs memory-mapped (`load_index_with_mmap`).

    python scripts/bench_mmap.py --index DIR [--queries 200] [--collection TSV]

DIR: any colbert-jax index without pending updates, e.g. the 100x index `scripts/bench_update.py` leaves (or
`scripts/bench_scale.py`'s). Each configuration runs in a fresh process: load the default checkpoint, note
the RSS (the model's share), open a Searcher, search every query once (warm-up: compilation), then three
timed batched passes (median) and 100 single queries (p50); peak RSS is the process's maximum resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

RUN = """
import json, resource, sys, time
import numpy as np
import colbert_jax
from colbert_jax.default_model import default_checkpoint
from colbert_jax.queries import load_queries

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

index, queries_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
queries = load_queries(queries_path)
model = colbert_jax.load_checkpoint(str(default_checkpoint()))
model.encode_queries(["warm up the encoder"])
model_mb = rss_mb()
t0 = time.perf_counter()
kwargs = {"load_index_with_mmap": True} if mode == "mmap" else {"implementation": mode}
s = colbert_jax.Searcher(index, model, allow_other_checkpoint=True, **kwargs)
s.search_all(queries, k=10)
first = time.perf_counter() - t0
times = []
for _ in range(3):
    t = time.perf_counter(); s.search_all(queries, k=10); times.append(time.perf_counter() - t)
lat = []
for q in list(queries.values())[:100]:
    t = time.perf_counter(); s.search(q, k=10); lat.append(time.perf_counter() - t)
print("RESULT " + json.dumps({"mode": mode, "model_rss_mb": model_mb, "peak_rss_mb":
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "open_and_first_pass_s": first,
    "batched_qps": len(queries) / float(np.median(times)), "single_p50_ms": 1000 * float(np.median(lat))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--collection", help="TSV the queries are drawn from (default: the built-in corpus)")
    ap.add_argument("--modes", nargs="+", default=["streamed", "jnp", "mmap"])
    args = ap.parse_args()
    from bench_index import run, write_builtin_collection
    from bench_search import write_queries

    import colbert_jax

    work = Path(tempfile.mkdtemp(prefix="bench-mmap-"))
    collection = Path(args.collection) if args.collection else work / "stdlib.tsv"
    if not args.collection:
        write_builtin_collection(collection)
    queries = work / "queries.tsv"
    write_queries(collection, queries, args.queries)
    index = colbert_jax.Index.open(args.index, verify=False)
    size_mb = index.nbytes() / 2**20
    rows = [
        run([sys.executable, "-c", RUN, args.index, str(queries), m], env={"PYTHONPATH": str(REPO)}) for m in args.modes
    ]
    print(f"\n{index}: {size_mb:,.0f} MiB on disk; k=10, {args.queries} queries, {os.cpu_count()} CPUs\n")
    print("| mode | peak RSS MiB | model MiB | peak - model | q/s (batched) | p50 ms (single) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['peak_rss_mb']:,.0f} | {r['model_rss_mb']:,.0f} | "
            f"{r['peak_rss_mb'] - r['model_rss_mb']:,.0f} | {r['batched_qps']:.1f} | {r['single_p50_ms']:.1f} |"
        )
    print("RESULTS " + json.dumps(rows))


if __name__ == "__main__":
    main()
