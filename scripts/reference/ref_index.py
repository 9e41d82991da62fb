"""Index a collection with colbert-ai (CPU) and print timing as JSON. Run with the reference venv's python.

ref_index.py --checkpoint DIR --collection TSV --index DIR --nbits 2
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/colbert-torch-ext")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--collection", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--nbits", type=int, default=2)
    args = ap.parse_args()
    from colbert import Indexer
    from colbert.infra import ColBERTConfig, Run, RunConfig

    index = Path(args.index).resolve()
    shutil.rmtree(index, ignore_errors=True)
    work = tempfile.mkdtemp(prefix="ref-index-")  # colbert-ai records git state of the cwd
    os.chdir(work)
    with Run().context(RunConfig(nranks=1, gpus=0, root=work, experiment="bench", name="bench")):
        t0 = time.perf_counter()
        Indexer(checkpoint=args.checkpoint, config=ColBERTConfig(nbits=args.nbits)).index(
            name=str(index), collection=str(Path(args.collection).resolve()), overwrite=True
        )
        seconds = time.perf_counter() - t0
    meta = json.loads((index / "metadata.json").read_text())
    size = sum(f.stat().st_size for f in index.iterdir() if f.is_file())
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": seconds,
                "num_embeddings": meta["num_embeddings"],
                "num_partitions": meta["num_partitions"],
                "bytes": size,
            }
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
