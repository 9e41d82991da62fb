"""Search speed and quality: colbert-jax vs colbert-ai on the same collection, checkpoint, nbits and queries.

    python scripts/bench_search.py [--nbits 2] [--queries 500] [--ref-python /tmp/colbert-ref-venv/bin/python]
                                   [--collection TSV [--queries-file TSV]] [--checkpoint DIR]

Builds (or reuses, where --ours-index / --ref-index exist) one index per system of the collection (default: the
built-in corpus, Python standard-library docstrings, ~3,900 passages; or any `pid \t text [\t title]` TSV)
with the checkpoint (default: the packaged MiniLM), then for k = 10 and 100 measures, each system in a fresh
process after a warm-up pass over all queries:
- batched: queries/s of `search_all` over all queries (median of 3 passes, query encoding included);
- one at a time: p50 / p95 latency of single queries (encode + retrieve, also reported apart);
- quality: overlap@10 of PLAID with exact MaxSim over the uncompressed embeddings (computed once, by our
  encoder, which matches colbert-ai's within 1e-4).
Queries: --queries-file (`qid \t text`), or the first 4-9 words of --queries seeded random passages. Prints
markdown tables and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_index import run, write_builtin_collection  # noqa: E402

OURS = """
import json, sys, time
import numpy as np
import colbert_jax
from colbert_jax.queries import load_queries
index, queries_path, ks, single = sys.argv[1], sys.argv[2], [int(k) for k in sys.argv[3].split(",")], int(sys.argv[4])
queries = load_queries(queries_path)
qids = list(queries)
s = colbert_jax.Searcher(index, truncate=True)
out = {"batched_qps": {}, "single_ms": {}, "top10": {}}
for k in ks:
    s.search_all(queries, k=k)  # warm-up: compiles every shape this query set needs
    for q in qids[:single]:
        s.search(queries[q], k=k)
    times = []
    for _ in range(3):
        t0 = time.perf_counter(); ranking = s.search_all(queries, k=k); times.append(time.perf_counter() - t0)
    out["batched_qps"][k] = len(qids) / float(np.median(times))
    if k == 10:
        out["top10"] = {str(q): [p for p, _, _ in ranking[q][:10]] for q in qids}
    enc, total = [], []
    for q in qids[:single]:
        t0 = time.perf_counter(); s.encode([queries[q]]); t1 = time.perf_counter()
        s.search(queries[q], k=k); t2 = time.perf_counter()
        enc.append(t1 - t0); total.append(t2 - t1)
    out["single_ms"][k] = {"p50": 1000 * float(np.median(total)), "p95": 1000 * float(np.percentile(total, 95)),
                           "encode_p50": 1000 * float(np.median(enc)),
                           "retrieve_p50": 1000 * float(np.median(total) - np.median(enc))}
print("RESULT " + json.dumps(out))
"""


def write_queries(collection: Path, path: Path, n: int, seed: int = 1) -> None:
    lines = [line.split("\t") for line in collection.read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for qid, row in enumerate(rng.choice(len(lines), n, replace=False)):
            words = lines[row][1].split()
            f.write(f"{qid}\t{' '.join(words[: int(rng.integers(4, 10))])}\n")


def exact_top10(checkpoint: str, collection: Path, queries: Path) -> dict[str, list[int]]:
    import colbert_jax
    from colbert_jax.indexing.collection import Collection
    from colbert_jax.queries import load_queries

    model = colbert_jax.load_checkpoint(checkpoint)
    coll = Collection.load(collection)
    flat, doclens = model.encode_docs_flat(coll.texts(range(len(coll))))
    qs = load_queries(queries)
    Q = model.encode_queries(list(qs.values()))
    starts = np.concatenate([[0], np.cumsum(doclens)[:-1]])
    out = {}
    for qid, q in zip(qs, Q):
        scores = np.maximum.reduceat(flat @ q.T, starts, axis=0).sum(1)
        out[str(qid)] = coll.pids[np.argsort(-scores, kind="stable")[:10]].tolist()
    return out


def overlap(top10: dict, exact: dict) -> float:
    return float(np.mean([len(set(top10[q]) & set(exact[q])) / 10 for q in exact]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nbits", type=int, default=2)
    ap.add_argument("--queries", type=int, default=500, help="number of queries")
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--collection", help="TSV collection: pid, text[, title] (default: the built-in corpus)")
    ap.add_argument("--queries-file", help="TSV queries: qid, text (default: --queries passage openings)")
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the packaged MiniLM)")
    ap.add_argument("--ours-index", help="colbert-jax index of the collection: reused if present, else built here")
    ap.add_argument("--ref-index", help="colbert-ai index of the collection: reused if present, else built here")
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "/tmp/colbert-ref-venv/bin/python"))
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from colbert_jax.default_model import default_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    if args.collection:
        collection = Path(args.collection).resolve()
        n = sum(1 for line in collection.read_text().splitlines() if line.strip())
        name = collection.name
    else:
        collection = work / "stdlib.tsv"
        n = write_builtin_collection(collection)
        name = "built-in corpus"
    if args.queries_file:
        queries = Path(args.queries_file).resolve()
    else:
        queries = work / "queries.tsv"
        write_queries(collection, queries, args.queries)
    n_queries = sum(1 for line in queries.read_text().splitlines() if line.strip())
    checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else str(default_checkpoint())
    env = {"PYTHONPATH": str(REPO)}
    ks = "10,100"

    ours_index = args.ours_index or str(work / "ours")
    if not Path(ours_index).exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts/index.py"),
                "--checkpoint",
                checkpoint,
                "--collection",
                str(collection),
                "--index",
                ours_index,
                "--nbits",
                str(args.nbits),
            ],
            check=True,
            env={**os.environ, **env},
            capture_output=True,
        )
    results = {"ours": run([sys.executable, "-c", OURS, ours_index, str(queries), ks, str(args.single)], env=env)}
    if not args.skip_reference:
        ref_index = args.ref_index or str(work / "ref")
        if not Path(ref_index).exists():
            run(
                [
                    args.ref_python,
                    str(REPO / "scripts/reference/ref_index.py"),
                    "--checkpoint",
                    checkpoint,
                    "--collection",
                    str(collection),
                    "--index",
                    ref_index,
                    "--nbits",
                    str(args.nbits),
                ]
            )
        results["colbert-ai"] = run(
            [
                args.ref_python,
                str(REPO / "scripts/reference/ref_search.py"),
                "--index",
                ref_index,
                "--checkpoint",
                checkpoint,
                "--collection",
                str(collection),
                "--queries",
                str(queries),
                "--ks",
                "10",
                "100",
                "--single",
                str(args.single),
            ]
        )
    exact = exact_top10(checkpoint, collection, queries)

    cpu = platform.processor() or platform.machine()
    print(f"\n{name}: {n} passages, {n_queries} queries, nbits={args.nbits}, {cpu}, {os.cpu_count()} CPUs\n")
    print("| system | k | batched queries/s | single p50 ms | single p95 ms | encode p50 ms | retrieve p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for k in ("10", "100"):
            s = r["single_ms"][k]
            print(
                f"| {name} | {k} | {r['batched_qps'][k]:.1f} | {s['p50']:.1f} | {s['p95']:.1f} | "
                f"{s['encode_p50']:.1f} | {s['retrieve_p50']:.1f} |"
            )
    print("\n| system | overlap@10 with exact search (k=10 defaults) |\n|---|---|")
    quality = {}
    for name, r in results.items():
        quality[f"{name}_vs_exact"] = overlap(r["top10"], exact)
        print(f"| {name} | {quality[f'{name}_vs_exact']:.3f} |")
    if "colbert-ai" in results:
        quality["ours_vs_colbert-ai"] = overlap(results["ours"]["top10"], results["colbert-ai"]["top10"])
        print(f"\ntop-10 overlap of ours with colbert-ai's: {quality['ours_vs_colbert-ai']:.3f}")
    if "colbert-ai" in results:
        o, c = results["ours"], results["colbert-ai"]
        for k in ("10", "100"):
            print(
                f"\nk={k}: batched {o['batched_qps'][k] / c['batched_qps'][k]:.2f}x the reference's queries/s; "
                f"single-query latency {o['single_ms'][k]['p50'] / c['single_ms'][k]['p50']:.2f}x the reference's"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "quality": quality}, indent=2) + "\n")


if __name__ == "__main__":
    main()
