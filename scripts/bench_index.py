"""Indexing throughput and index size: colbert-jax vs colbert-ai, same collection, checkpoint and nbits.

    python scripts/bench_index.py [--collection TSV] [--nbits 2] [--ref-python /tmp/colbert-ref-venv/bin/python]

Default collection: the built-in corpus (Python standard-library docstrings, ~3,900 passages) written to
a TSV, so both read identical text. Each side runs in a fresh process and is timed around its
`Indexer.index` call (model load excluded, JIT compilation and k-means included). Prints a markdown table.
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

REPO = Path(__file__).resolve().parents[1]
OURS = """
import json, sys, time
import colbert_jax
ix = colbert_jax.Indexer(sys.argv[1], nbits=int(sys.argv[4]), show_progress=False)
t0 = time.perf_counter()
ix.index(sys.argv[3], sys.argv[2], overwrite=True)
seconds = time.perf_counter() - t0
index = colbert_jax.Index.open(sys.argv[3], verify=False)
print("RESULT " + json.dumps({"seconds": seconds, "num_embeddings": index.num_embeddings,
                              "num_partitions": index.num_partitions, "bytes": index.nbytes(), "stats": ix.stats}))
"""


def run(cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        sys.exit(f"command failed: {' '.join(cmd[:3])}...\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def write_builtin_collection(path: Path) -> int:
    from colbert_jax.data.stdlib_corpus import stdlib_passages

    passages = stdlib_passages()
    with open(path, "w") as f:
        for pid, (title, text) in enumerate(passages):
            f.write(f"{pid}\t{text}\t{title}\n")
    return len(passages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collection", help="TSV collection (default: the built-in corpus)")
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the packaged MiniLM model)")
    ap.add_argument("--nbits", type=int, default=2)
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "/tmp/colbert-ref-venv/bin/python"))
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from colbert_jax.default_model import default_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    collection = Path(args.collection) if args.collection else work / "stdlib.tsv"
    if not args.collection:
        write_builtin_collection(collection)
    n = sum(1 for line in open(collection) if line.strip())
    checkpoint = str(args.checkpoint or default_checkpoint())

    results = {
        "ours": run(
            [sys.executable, "-c", OURS, checkpoint, str(collection), str(work / "ours"), str(args.nbits)],
            env={"PYTHONPATH": str(REPO)},
        )
    }
    if not args.skip_reference:
        results["colbert-ai"] = run(
            [
                args.ref_python,
                str(REPO / "scripts/reference/ref_index.py"),
                "--checkpoint",
                checkpoint,
                "--collection",
                str(collection),
                "--index",
                str(work / "ref"),
                "--nbits",
                str(args.nbits),
            ]
        )
    cpu = platform.processor() or platform.machine()
    print(f"\ncollection: {collection.name} ({n} passages), nbits={args.nbits}, {cpu}, {os.cpu_count()} CPUs\n")
    print("| system | seconds | passages/s | embeddings | partitions | index bytes | bytes/embedding |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds']:.1f} | {n / r['seconds']:.1f} | {r['num_embeddings']:,} | "
            f"{r['num_partitions']:,} | {r['bytes']:,} | {r['bytes'] / r['num_embeddings']:.2f} |"
        )
    if "colbert-ai" in results:
        ours, ref = results["ours"], results["colbert-ai"]
        print(
            f"\nspeedup (passages/s): {ref['seconds'] / ours['seconds']:.2f}x; "
            f"index size ratio ours/colbert-ai: {ours['bytes'] / ref['bytes']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"passages": n, "nbits": args.nbits, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
