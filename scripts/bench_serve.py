"""HTTP serving: requests/s and latency at 1, 8 and 64 concurrent clients, colbert-jax vs colbert-ai.

    python scripts/bench_serve.py --ours-index DIR [--ref-index DIR] [--collection TSV]
        [--ref-python /tmp/colbert-ref-venv/bin/python]

Both servers run on loopback over the same index data (build them with scripts/bench_search.py or
scripts/index.py / scripts/reference/ref_index.py on the same collection). colbert-ai's server is its
server.py behaviour (Flask, one `search(query, k=100)` per request, an LRU cache keyed by the query):
every request here carries a distinct query, so the cache never hits. Each client sends its requests
one after another (GET /api/search?query=...&k=10); the first 10% of requests per level are warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LEVELS = {1: 200, 8: 400, 64: 1280}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_queries(collection: Path, n: int, seed: int = 2) -> list[str]:
    words = [line.split("\t")[1].split() for line in collection.read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        w = words[rng.integers(len(words))]
        start = int(rng.integers(max(1, len(w) - 4)))
        q = " ".join(w[start : start + int(rng.integers(3, 8))])
        if q and q not in seen:
            seen.add(q)
            out.append(q)
    return out


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit("server did not start")


async def load(url: str, queries: list[str], clients: int) -> dict:
    latencies: list[float] = []
    errors = 0
    it = iter(queries)
    warmup = len(queries) // 10

    async def client(c: httpx.AsyncClient):
        nonlocal errors
        for q in it:
            t0 = time.perf_counter()
            r = await c.get(f"{url}/api/search", params={"query": q, "k": 10})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies[warmup:]) * 1000
    return {
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.median(lat)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def bench(name: str, cmd: list[str], url: str, queries: list[str], env=None) -> dict:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        wait_healthy(url, proc)
        results, offset = {}, 0
        for clients, n in LEVELS.items():
            results[clients] = asyncio.run(load(url, queries[offset : offset + n], clients))
            offset += n
            print(f"{name} clients={clients}: {results[clients]}", file=sys.stderr)
        return results
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours-index", required=True)
    ap.add_argument("--ref-index")
    ap.add_argument("--collection", help="collection TSV (default: the one recorded in our index)")
    ap.add_argument("--checkpoint", help="checkpoint (default: the packaged MiniLM model)")
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "/tmp/colbert-ref-venv/bin/python"))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from colbert_jax.default_model import default_checkpoint

    meta = json.loads((Path(args.ours_index) / "metadata.json").read_text())
    collection = Path(args.collection or meta["collection"]["source"])
    checkpoint = str(args.checkpoint or default_checkpoint())
    queries = unique_queries(collection, sum(LEVELS.values()))

    port = free_port()
    results = {
        "colbert-jax": bench(
            "colbert-jax",
            [sys.executable, "-m", "colbert_jax.cli", "serve", "--index", args.ours_index, "--port", str(port)],
            f"http://127.0.0.1:{port}",
            queries,
            env={"PYTHONPATH": str(REPO)},
        )
    }
    if args.ref_index:
        port = free_port()
        results["colbert-ai"] = bench(
            "colbert-ai",
            [
                args.ref_python,
                str(REPO / "scripts/reference/ref_server.py"),
                "--index",
                args.ref_index,
                "--checkpoint",
                checkpoint,
                "--collection",
                str(collection),
                "--port",
                str(port),
            ],
            f"http://127.0.0.1:{port}",
            queries,
        )
    print(f"\n{collection.name}, k=10 requests (searched at k=100 parameters), {os.cpu_count()} CPUs\n")
    print("| server | clients | requests/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
    for name, levels in results.items():
        for clients, r in levels.items():
            print(
                f"| {name} | {clients} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['errors']} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
