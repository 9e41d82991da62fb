"""Peak memory and speed of search with the index in memory vs memory-mapped (`load_index_with_mmap`).

    python scripts/bench_mmap.py --index DIR [--queries 200 | --queries-file TSV] [--batch-sizes 8 64]
        [--modes streamed mmap] [--repeats 3]

DIR: any colbert-jax index without pending updates, e.g. `scripts/bench_scale.py --work W`'s W/ours100.
Each run is a fresh process: load the default checkpoint and encode one query (its RSS is "model", its
VmHWM "its peak"), open the index (`verify=False`) and a Searcher, place the index (RSS "loaded"), search
every query once (warm-up: compilation, or loading programs from the compilation cache), then three timed
batched passes (median q/s) and 50 single queries (p50). Peak is the process's maximum resident set (VmHWM)
over the whole run; "load peak" is its value right after placing the index. Modes: `streamed` (in memory,
the CPU default), `mmap` (`load_index_with_mmap=True`: on the CPU the streamed path with residuals read per
batch), `jnp` (in memory, staged). The runs of one repeat go back to back (mode by mode, batch size by batch
size), so a shared machine's load hits them alike; the table gives the median over repeats and the min-max
spread.

`--interleaved N` then times N single queries in both modes at once: two warm processes (the warm-up above,
then 20 single queries) take turns query by query (alternating which goes first), so that a shared
machine's changing load falls on both alike; it prints each mode's p50 and the median of the per-query
ratios mmap / streamed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

RUN = """
import json, sys, time
import numpy as np
import colbert_jax
from colbert_jax.default_model import default_checkpoint
from colbert_jax.queries import load_queries

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024

index, queries_path, mode, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
queries = load_queries(queries_path)
model = colbert_jax.load_checkpoint(str(default_checkpoint()))
model.encode_queries(["warm up the encoder"])
model_mb, model_peak_mb = status("VmRSS"), status("VmHWM")
t0 = time.perf_counter()
kwargs = {"load_index_with_mmap": True} if mode == "mmap" else {"implementation": mode}
s = colbert_jax.Searcher(colbert_jax.Index.open(index, verify=False), model, allow_other_checkpoint=True, **kwargs)
s.arrays
loaded_mb, load_peak_mb, load_s = status("VmRSS"), status("VmHWM"), time.perf_counter() - t0
s.search_all(queries, k=10, batch_size=batch)
times = []
for _ in range(3):
    t = time.perf_counter(); s.search_all(queries, k=10, batch_size=batch); times.append(time.perf_counter() - t)
lat = []
for q in list(queries.values())[:50]:
    t = time.perf_counter(); s.search(q, k=10); lat.append(time.perf_counter() - t)
print("RESULT " + json.dumps({"mode": mode, "batch": batch, "model_mb": model_mb,
    "model_peak_mb": model_peak_mb, "loaded_mb": loaded_mb,
    "load_peak_mb": load_peak_mb, "peak_mb": status("VmHWM"), "end_mb": status("VmRSS"), "load_s": load_s,
    "qps": len(queries) / float(np.median(times)), "p50_ms": 1000 * float(np.median(lat))}))
"""

WORKER = """
import sys, time
import colbert_jax
from colbert_jax.default_model import default_checkpoint
from colbert_jax.queries import load_queries

index, queries_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
queries = list(load_queries(queries_path).values())
model = colbert_jax.load_checkpoint(str(default_checkpoint()))
kwargs = {"load_index_with_mmap": True} if mode == "mmap" else {"implementation": mode}
s = colbert_jax.Searcher(colbert_jax.Index.open(index, verify=False), model, allow_other_checkpoint=True, **kwargs)
s.search_all(queries, k=10, batch_size=8)
for q in queries[:20]:
    s.search(q, k=10)
print("ready", flush=True)
for line in sys.stdin:
    q = queries[int(line) % len(queries)]
    t = time.perf_counter(); s.search(q, k=10); print(time.perf_counter() - t, flush=True)
"""


def interleaved(index: str, queries: Path, n: int, modes: tuple[str, str] = ("mmap", "streamed")) -> dict:
    """Single-query seconds of two modes, taking turns query by query in two warm processes -> p50s (ms) and
    the median per-query ratio modes[0] / modes[1]."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-c", WORKER, index, str(queries), m],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for m in modes
    }
    try:
        for m, p in procs.items():
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {m} worker did not start (exit status {p.wait()})")
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(n):
            for m in modes if i % 2 == 0 else modes[::-1]:
                procs[m].stdin.write(f"{i}\n")
                procs[m].stdin.flush()
                times[m].append(float(procs[m].stdout.readline()))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    a, b = (np.asarray(times[m]) for m in modes)
    return {
        "n": n,
        f"{modes[0]}_p50_ms": round(1000 * float(np.median(a)), 1),
        f"{modes[1]}_p50_ms": round(1000 * float(np.median(b)), 1),
        "median_ratio": round(float(np.median(a / b)), 3),
    }


COLUMNS = ("model_mb", "model_peak_mb", "loaded_mb", "load_peak_mb", "peak_mb", "end_mb", "qps", "p50_ms")


def _cell(values: list[float], digits: int) -> str:
    med = f"{np.median(values):,.{digits}f}"
    return med if len(values) == 1 else f"{med} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--queries-file", help="queries TSV (default: --queries drawn from --collection)")
    ap.add_argument("--collection", help="TSV the queries are drawn from (default: the built-in corpus)")
    ap.add_argument("--modes", nargs="+", default=["streamed", "mmap"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--interleaved", type=int, default=0, metavar="N", help="then N single queries, both modes in turn")
    args = ap.parse_args()
    from bench_index import run, write_builtin_collection
    from bench_search import write_queries

    import colbert_jax

    work = Path(tempfile.mkdtemp(prefix="bench-mmap-"))
    if args.queries_file:
        queries = Path(args.queries_file)
    else:
        collection = Path(args.collection) if args.collection else work / "stdlib.tsv"
        if not args.collection:
            write_builtin_collection(collection)
        queries = work / "queries.tsv"
        write_queries(collection, queries, args.queries)
    n_queries = sum(1 for line in queries.read_text().splitlines() if line.strip())
    index = colbert_jax.Index.open(args.index, verify=False)
    size_mb = index.nbytes() / 2**20
    rows: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.repeats):
        for batch in args.batch_sizes:
            for mode in args.modes:
                cmd = [sys.executable, "-c", RUN, args.index, str(queries), mode, str(batch)]
                result = run(cmd, env={"PYTHONPATH": str(REPO)})
                print(f"repeat {r} {json.dumps(result)}", flush=True)
                rows.setdefault((mode, batch), []).append(result)
    goal = size_mb / 3
    print(f"\n{index}: {size_mb:,.0f} MiB on disk (a third: {goal:,.0f} MiB); k=10, {n_queries} queries, ")
    print(f"{os.cpu_count()} CPUs, {args.repeats} repeats: median (min-max)\n")
    print(
        "| mode | batch | model MiB (its peak) | loaded MiB | load peak MiB | peak MiB | peak - model | q/s "
        "| p50 ms (single) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, batch), results in rows.items():
        col = {c: [x[c] for x in results] for c in COLUMNS}
        over = [x["peak_mb"] - x["model_mb"] for x in results]
        print(
            f"| {mode} | {batch} | {_cell(col['model_mb'], 0)} ({np.median(col['model_peak_mb']):,.0f}) | "
            f"{_cell(col['loaded_mb'], 0)} | "
            f"{_cell(col['load_peak_mb'], 0)} | {_cell(col['peak_mb'], 0)} | {_cell(over, 0)} | "
            f"{_cell(col['qps'], 1)} | {_cell(col['p50_ms'], 1)} |"
        )
    print("RESULTS " + json.dumps({f"{m}/{b}": v for (m, b), v in rows.items()}))
    if args.interleaved:
        print("INTERLEAVED " + json.dumps(interleaved(args.index, queries, args.interleaved)))


if __name__ == "__main__":
    main()
