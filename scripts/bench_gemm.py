"""float32 matrix products of the query encoder's shapes, by each library that could run them, side by side: XLA
(what batched encoding runs), our native kernel (`colbert_jax.native.dense_f32`, what one query's encoding
runs), our bfloat16-operand kernel (`native.dense_bf16`, `query_quantization="bf16"`, where AVX-512 BF16 runs
it; its rate counts the same FLOPs), numpy's BLAS (OpenBLAS in numpy's wheels) and torch's (colbert-ai's
encoder; MKL in torch's x86 wheels), on one core and on all cores.

    python scripts/bench_gemm.py [--rows 2048] [--repeats 3] [--ref-python /work/refvenv/bin/python]

The shapes are MiniLM's dense layers: x [rows, K] times w [K, N] for (K, N) = (384, 1152) fused QKV, (384, 384)
attention output, (384, 1536) and (1536, 384) the MLP; rows 2048 is a batch of 64 queries of 32 tokens, 32 one
query. Each repeat runs every library in a fresh process, one after the other (a noisy machine slows
neighbours alike); one core is the process pinned to the first CPU (`sched_setaffinity`, before any library
starts its threads). Each cell is the median over repeats of each process's median of 30 calls, GFLOP/s, with
the spread over repeats. The vector unit's own peak is `scripts/bench_cpu_peak.py`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = ((384, 1152), (384, 384), (384, 1536), (1536, 384))

CHILD = """
import json, os, sys, time
rows, library, one_core = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
if one_core:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
import numpy as np
shapes = json.loads(sys.argv[4])
rng = np.random.default_rng(0)
if library == "torch":
    import torch
    torch.set_num_threads(1 if one_core else len(os.sched_getaffinity(0)))
elif library in ("xla", "native", "native_bf16"):
    import jax, jax.numpy as jnp
    from colbert_jax import native
    if library == "native" and not native.enabled():
        print("RESULT null"); sys.exit(0)
    if library == "native_bf16" and not (native.enabled() and native.dense_bf16_vectorized()):
        print("RESULT null"); sys.exit(0)

def product(k, n):
    x = rng.standard_normal((rows, k), np.float32); w = rng.standard_normal((k, n), np.float32)
    if library == "numpy":
        return lambda: x @ w
    if library == "torch":
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        return lambda: tx @ tw
    jx = jnp.asarray(x)
    if library == "xla":
        f, jw = jax.jit(lambda a, b: a @ b), jnp.asarray(w)
    elif library == "native":
        f, jw = jax.jit(lambda a, b: native.dense_f32(a, b, n)), jnp.asarray(native.pack_dense_f32(w))
    else:
        f, jw = jax.jit(lambda a, b: native.dense_bf16(a, b, n)), jnp.asarray(native.pack_dense_bf16(w))
    return lambda: f(jx, jw).block_until_ready()

rates = []
for k, n in shapes:
    call = product(k, n)
    for _ in range(3):
        call()
    times = []
    for _ in range(30):
        t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
    rates.append(2 * rows * k * n / float(np.median(times)) / 1e9)
print("RESULT " + json.dumps(rates))
"""


def run(python: str, rows: int, library: str, one_core: bool) -> list[float] | None:
    """One process's GFLOP/s per shape (None: that library is not available to it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [python, "-c", CHILD, str(rows), library, "1" if one_core else "0", json.dumps(SHAPES)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {library} ({python}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-python", help="a Python with torch (colbert-ai's venv) for torch's products")
    args = ap.parse_args()
    systems = [("XLA", sys.executable, "xla"), ("native dense_f32", sys.executable, "native")]
    # bfloat16 operands, float32 sums (`query_quantization="bf16"`): skipped where `vdpbf16ps` does not run
    systems.append(("native dense_bf16", sys.executable, "native_bf16"))
    systems.append(("numpy (its BLAS)", sys.executable, "numpy"))
    if args.ref_python:
        systems.append(("torch", args.ref_python, "torch"))
    cores = len(os.sched_getaffinity(0))
    results: dict[tuple[str, bool], list[list[float]]] = {}
    for _ in range(args.repeats):
        for one_core in (True, False):
            for name, python, library in systems:
                rates = run(python, args.rows, library, one_core)
                if rates is not None:
                    results.setdefault((name, one_core), []).append(rates)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(f"{cpu}, {cores} CPUs, {platform.machine()}; rows {args.rows}; {args.repeats} repeats; GFLOP/s")
    print("| library | cores | " + " | ".join(f"{k}x{n}" for k, n in SHAPES) + " |")
    print("|---|---|" + "---|" * len(SHAPES))
    for (name, one_core), runs in results.items():
        per_shape = np.array(runs)
        cells = [f"{np.median(c):.0f} ({c.min():.0f}-{c.max():.0f})" for c in per_shape.T]
        print(f"| {name} | {1 if one_core else cores} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
