"""How fast `colbert-jax serve` is ready: seconds from launch to the port open, the first search answered and
`/health` saying ok, with an empty compilation cache (cold) and then with the one the cold start filled
(warm, a restart).

    python scripts/bench_startup.py --index DIR [--repeats 3]

Runs the server as a subprocess on a free loopback port; prints a table (median and range over repeats).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx


def start_once(index: str, cache: str, timeout: float = 600.0) -> dict[str, float]:
    env = {**os.environ, "COLBERT_JAX_CACHE": cache}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "colbert_jax.cli", "serve", "--index", index, "--port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    try:
        url = None
        while url is None:
            if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError("server did not start:\n" + "".join(lines))
            url = next((ln.split(" at ")[1].split("/ ")[0] for ln in lines if ln.startswith("serving")), None)
            time.sleep(0.01)
        port_open = time.perf_counter() - t0
        while True:  # the address is printed when bound; the first connections may come before it listens
            try:
                r = httpx.get(
                    f"{url}/api/search", params={"query": "read a file line by line", "k": 10}, timeout=timeout
                )
                break
            except httpx.ConnectError:
                if time.perf_counter() - t0 > timeout:
                    raise
                time.sleep(0.01)
        r.raise_for_status()
        first_search = time.perf_counter() - t0
        while httpx.get(f"{url}/health", timeout=timeout).json()["status"] != "ok":
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError("warm-up did not finish")
            time.sleep(0.05)
        ready = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    return {"port open": port_open, "first search": first_search, "health ok": ready}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="a colbert-jax index")
    ap.add_argument("--repeats", type=int, default=3, help="cold + warm start pairs")
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        cache = tempfile.mkdtemp(prefix="colbert-jax-startup-")
        try:
            runs["cold"].append(start_once(args.index, cache))
            runs["warm"].append(start_once(args.index, cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"index: {args.index}; {args.repeats} repeats; seconds, median (min-max)")
    print("| start | port open | first search answered | /health ok |")
    print("|---|---|---|---|")
    for kind, results in runs.items():
        cells = []
        for key in ("port open", "first search", "health ok"):
            values = [r[key] for r in results]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
