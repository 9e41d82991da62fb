"""What an update costs: adding 1 % of a 100x-scale index in place vs building the index again.

    python scripts/bench_update.py [--factor 100] [--share 0.01] [--json OUT]

Builds our nbits=2 index of the built-in corpus (about 3,900 passages, the default MiniLM checkpoint, timed:
the 1x build), synthesises the x-F index from it as `scripts/bench_scale.py` does (16.5 M embeddings at
100x), then adds `share` of its passages (built-in corpus texts, as a list: new pids) with `Indexer().add`
and measures the add's wall time (model load excluded) and the bytes it wrote (files new or grown under the
index). A rebuild's cost is the index's size in bytes and, for time, F times the 1x build (encoding dominates
a build and grows linearly; a 100x build takes over an hour on 2 cores, so it is extrapolated, not run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))


def sizes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factor", type=int, default=100)
    ap.add_argument("--share", type=float, default=0.01)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from bench_index import write_builtin_collection
    from bench_scale import synthesize

    import colbert_jax
    from colbert_jax.default_model import default_checkpoint
    from colbert_jax.indexing.collection import Collection

    work = Path(tempfile.mkdtemp(prefix="bench-update-"))
    collection = work / "stdlib.tsv"
    write_builtin_collection(collection)
    model = colbert_jax.load_checkpoint(str(default_checkpoint()))
    t0 = time.perf_counter()
    colbert_jax.Indexer(model, nbits=2, show_progress=False).index(work / "base", collection)
    build_1x = time.perf_counter() - t0
    base = colbert_jax.Index.open(work / "base")

    big = work / f"x{args.factor}"
    variants = {1: 1, 10: 4, 100: 16}.get(args.factor, 4)
    n, e, p = synthesize(base, args.factor, variants, big, work / "arrays")
    for f in (work / "arrays").iterdir():
        f.unlink()
    index_bytes = colbert_jax.Index.open(big, verify=False).nbytes()
    print(f"{args.factor}x index (left unchanged, for scripts/bench_mmap.py): {big}", file=sys.stderr)
    pristine, big = big, work / f"x{args.factor}-updated"
    shutil.copytree(pristine, big)
    texts = Collection.load(collection).texts(range(len(base.pids)))
    count = int(round(args.share * n))
    new = [texts[i % len(texts)] for i in range(count)]

    before = sizes(big)
    indexer = colbert_jax.Indexer(model, show_progress=False)
    t0 = time.perf_counter()
    indexer.add(big, new)
    add_seconds = time.perf_counter() - t0
    after = sizes(big)
    written = sum(size for name, size in after.items() if before.get(name) != size)
    result = {
        "factor": args.factor,
        "passages": n,
        "embeddings": e,
        "partitions": p,
        "added_passages": count,
        "added_embeddings": indexer.stats["embeddings"],
        "add_seconds": add_seconds,
        "add_bytes_written": written,
        "index_bytes": index_bytes,
        "build_1x_seconds": build_1x,
        "rebuild_seconds_extrapolated": build_1x * args.factor,
        "cpus": os.cpu_count(),
    }
    print("RESULT " + json.dumps(result))
    print(
        f"\n| index | add {count:,} passages ({args.share:.0%}) | rebuild |\n|---|---|---|\n"
        f"| {args.factor}x: {n:,} passages, {e:,} embeddings, {index_bytes / 1e6:,.0f} MB | "
        f"{add_seconds:.1f} s, {written / 1e6:.1f} MB written | "
        f"~{build_1x * args.factor / 60:.0f} min ({args.factor} x the 1x build's {build_1x:.1f} s), "
        f"{index_bytes / 1e6:,.0f} MB written |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
