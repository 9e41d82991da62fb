"""Soak and load test of `colbert-jax serve`, on loopback only; it stops by itself.

    .venv/bin/python scripts/bench_soak.py --minutes 10            # the issue's soak: 64 clients, 10 minutes
    .venv/bin/python scripts/bench_soak.py --minutes 2 --index DIR # a short one, on another index

Starts `colbert-jax serve` on a free loopback port (the built-in corpus index unless --index, built on first
use as the quickstart does), waits for /health to say "ok", then:
1. soak: `--clients` concurrent clients search in a loop for `--minutes`; per minute: requests, errors,
   p50 and p99 latency, the server's resident memory (RSS) and the CPU other jobs on the machine took (a slow
   minute from a noisy neighbour shows there); RSS growth after the first minute (warm-up);
2. burst: `--max-queue` + 200 requests at once: those beyond the queue get 503 with Retry-After; then 20
   requests in a row must all succeed (the server recovered);
3. SIGTERM with requests in flight: every one must be answered and the server exit (0, or -15: uvicorn
   re-raises the signal once it has shut down).
Prints a table; the exit status is 1 if any soak request failed, no 503 came, the server did not recover,
or the shutdown lost a request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

QUERIES = [
    "read a file line by line",
    "parse command line arguments",
    "sort a list in place",
    "current date and time",
    "join paths",
    "compress data with gzip",
    "open a socket connection",
    "format a string with padding",
    "copy a directory tree",
    "random number from a range",
    "encode bytes as base64",
    "wait for a subprocess to finish",
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def busy_ticks(pid: int | None = None) -> int:
    """CPU clock ticks spent so far: by the whole machine (`pid` None, from /proc/stat) or by one process."""
    if pid is None:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def start_server(index: str, max_queue: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "colbert_jax.cli", "serve", "--index", index, "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--max-queue", str(max_queue), "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # no access log
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        if found:
            url = found[1]
            break
        if time.monotonic() > deadline:
            break
    else:
        sys.exit(f"soak: the server did not start (exit {proc.wait()})")
    # Keep draining its log so that it never blocks on a full pipe.
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    while True:  # the port is bound at once but listens only once the server has loaded the index
        try:
            if httpx.get(f"{url}/health", timeout=60).json()["status"] == "ok":
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit("soak: the server did not start and warm up within 10 minutes")
        time.sleep(1)
    return proc, url


async def soak(url: str, pid: int, clients: int, seconds: float) -> list[dict]:
    records: list[tuple[float, float, int]] = []  # (start offset, latency, status)
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    stop = t0 + seconds

    async def client(seed: int):
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while time.monotonic() < stop:
                start = time.monotonic()
                try:
                    r = await c.get("/api/search", params={"query": rng.choice(QUERIES), "k": 10})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                records.append((start - t0, time.monotonic() - start, status))

    others = []  # (t, cores busy with work other than the server and these clients), per sample interval
    hz = os.sysconf("SC_CLK_TCK")

    async def sample_rss():
        last = (time.monotonic(), busy_ticks(), busy_ticks(pid) + busy_ticks(os.getpid()))
        while time.monotonic() < stop:
            rss.append((time.monotonic() - t0, rss_mb(pid)))
            await asyncio.sleep(5)
            now = (time.monotonic(), busy_ticks(), busy_ticks(pid) + busy_ticks(os.getpid()))
            other = ((now[1] - last[1]) - (now[2] - last[2])) / hz / (now[0] - last[0])
            others.append((now[0] - t0, max(other, 0.0)))
            last = now

    await asyncio.gather(sample_rss(), *(client(i) for i in range(clients)))
    minutes = []
    for m in range(int(np.ceil(seconds / 60))):
        rows = [(lat, st) for s, lat, st in records if m * 60 <= s < (m + 1) * 60]
        lat = np.array([lat for lat, st in rows if st == 200]) * 1000
        mem = [v for s, v in rss if m * 60 <= s < (m + 1) * 60]
        busy = [v for s, v in others if m * 60 <= s < (m + 1) * 60]
        minutes.append(
            {
                "minute": m + 1,
                "requests": len(rows),
                "errors": sum(st != 200 for _, st in rows),
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                "rss_mb": mem[-1] if mem else float("nan"),
                "other_cores": float(np.mean(busy)) if busy else float("nan"),
            }
        )
    return minutes


async def burst(url: str, count: int) -> tuple[int, int, int, bool]:
    """`count` requests at once -> (200s, 503s with Retry-After, others), then whether 20 in a row succeed."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        rs = await asyncio.gather(
            *(c.get("/api/search", params={"query": f"{QUERIES[i % len(QUERIES)]} {i}"}) for i in range(count)),
            return_exceptions=True,
        )
        ok = sum(isinstance(r, httpx.Response) and r.status_code == 200 for r in rs)
        busy = sum(isinstance(r, httpx.Response) and r.status_code == 503 and "retry-after" in r.headers for r in rs)
        recovered = True
        for q in QUERIES + QUERIES[:8]:
            recovered &= (await c.get("/api/search", params={"query": q})).status_code == 200
    return ok, busy, count - ok - busy, recovered


async def shutdown(url: str, proc: subprocess.Popen, in_flight: int) -> tuple[int, int, int]:
    """SIGTERM while `in_flight` requests are being answered -> (answered 200, failed, server exit code)."""
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=in_flight)) as c:
        tasks = [
            asyncio.create_task(c.post("/api/search", json={"queries": [f"{q} {i}" for q in QUERIES[:8]], "k": 100}))
            for i in range(in_flight)
        ]
        await asyncio.sleep(0.3)  # the requests are sent and queued
        proc.send_signal(signal.SIGTERM)
        rs = await asyncio.gather(*tasks, return_exceptions=True)
    ok = sum(isinstance(r, httpx.Response) and r.status_code == 200 for r in rs)
    code = await asyncio.to_thread(proc.wait, 120)
    return ok, in_flight - ok, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", help="index to serve (default: the built-in corpus, built on first use)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-queue", dest="max_queue", type=int, default=256)
    parser.add_argument("--max-batch", dest="max_batch", type=int, default=64)
    args = parser.parse_args()
    index = args.index
    if index is None:
        from colbert_jax.quickstart import prepare

        index = str(prepare(show_progress=True)[0].index.path)
    proc, url = start_server(index, args.max_queue, args.max_batch)
    try:
        t = time.monotonic()
        minutes = asyncio.run(soak(url, proc.pid, args.clients, args.minutes * 60))
        print(f"soak: {args.clients} clients for {time.monotonic() - t:.0f} s against {url} ({index})")
        print(
            "| minute | requests | errors | p50 ms | p99 ms | server RSS MB | other jobs' CPU (cores) |\n"
            "|---|---|---|---|---|---|---|"
        )
        for m in minutes:
            print(
                f"| {m['minute']} | {m['requests']} | {m['errors']} | {m['p50_ms']:.0f} | {m['p99_ms']:.0f} "
                f"| {m['rss_mb']:.0f} | {m['other_cores']:.2f} |"
            )
        warm = minutes[0]["rss_mb"]
        growth = (minutes[-1]["rss_mb"] - warm) / warm
        errors = sum(m["errors"] for m in minutes)
        print(f"RSS growth after the first minute: {growth:+.1%}; errors: {errors}")
        ok, busy, other, recovered = asyncio.run(burst(url, args.max_queue + 200))
        print(f"burst of {args.max_queue + 200}: {ok} answered, {busy} refused with 503 + Retry-After, {other} other; ")
        print(f"recovered (20 requests in a row answered): {recovered}")
        answered, lost, code = asyncio.run(shutdown(url, proc, 16))
        print(f"SIGTERM with 16 batch requests in flight: {answered} answered, {lost} lost; server exit code {code}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # uvicorn finishes the in-flight requests, then re-raises SIGTERM: -15 is a graceful exit too.
    return 1 if errors or not busy or not recovered or lost or code not in (0, -signal.SIGTERM) else 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
