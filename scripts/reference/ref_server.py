"""colbert-ai's server.py behaviour (Flask, Searcher.search(query, k=100) per request, lru_cache), bound to
loopback. Run with the reference venv's python: ref_server.py --index DIR --checkpoint DIR --collection TSV --port P
"""

import argparse
import math
import os
import sys
import tempfile
from functools import lru_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/colbert-torch-ext")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--collection", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    from colbert import Searcher
    from colbert.infra import ColBERTConfig, Run, RunConfig
    from flask import Flask, request

    work = tempfile.mkdtemp(prefix="ref-server-")
    os.chdir(work)
    with Run().context(RunConfig(nranks=1, gpus=0, root=work, experiment="bench", name="bench")):
        searcher = Searcher(
            index=args.index, checkpoint=args.checkpoint, collection=args.collection, config=ColBERTConfig()
        )
    app = Flask(__name__)

    @lru_cache(maxsize=1_000_000)
    def api_search_query(query, k):
        k = 10 if k is None else min(int(k), 100)
        pids, ranks, scores = searcher.search(query, k=100)
        pids, ranks, scores = pids[:k], ranks[:k], scores[:k]
        probs = [math.exp(s) for s in scores]
        total = sum(probs)
        topk = [
            {"text": searcher.collection[pid], "pid": pid, "rank": rank, "score": score, "prob": p / total}
            for pid, rank, score, p in zip(pids, ranks, scores, probs)
        ]
        return {"query": query, "topk": sorted(topk, key=lambda x: (-x["score"], x["pid"]))}

    @app.route("/api/search", methods=["GET"])
    def api_search():
        return api_search_query(request.args.get("query"), request.args.get("k"))

    @app.route("/health")
    def health():
        return {"status": "ok"}

    app.run("127.0.0.1", args.port)


if __name__ == "__main__":
    sys.exit(main())
