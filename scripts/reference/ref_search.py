"""Time colbert-ai search (CPU) on an index and print results as JSON. Run with the reference venv's python.

ref_search.py --index DIR --checkpoint DIR --collection TSV --queries TSV --ks 10 100 --single 200
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/colbert-torch-ext")


def reset(searcher):
    # colbert-ai's dense_search keeps the first call's ncells/threshold/ndocs: reset them for each k.
    searcher.configure(ncells=None, centroid_score_threshold=None, ndocs=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--collection", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import numpy as np
    from colbert import Searcher
    from colbert.data import Queries
    from colbert.infra import ColBERTConfig, Run, RunConfig

    queries = Queries(path=args.queries)
    qids = list(queries.keys())
    work = tempfile.mkdtemp(prefix="ref-search-")
    os.chdir(work)
    out = {"batched_qps": {}, "single_ms": {}, "top10": {}}
    with Run().context(RunConfig(nranks=1, gpus=0, root=work, experiment="bench", name="bench")):
        searcher = Searcher(
            index=args.index, checkpoint=args.checkpoint, collection=args.collection, config=ColBERTConfig()
        )
        for k in args.ks:
            reset(searcher)
            searcher.search_all(queries, k=k)  # warm-up
            times = []
            for _ in range(args.repeats):
                reset(searcher)
                t0 = time.perf_counter()
                ranking = searcher.search_all(queries, k=k)
                times.append(time.perf_counter() - t0)
            out["batched_qps"][k] = len(qids) / float(np.median(times))
            if k == 10:
                data = ranking.todict()
                out["top10"] = {str(q): [pid for pid, *_ in data[q][:10]] for q in qids}
            reset(searcher)
            enc, ret, total = [], [], []
            for q in qids[: args.single]:
                text = queries[q]
                t0 = time.perf_counter()
                Q = searcher.encode(text)
                t1 = time.perf_counter()
                searcher.dense_search(Q, k=k)
                t2 = time.perf_counter()
                enc.append(t1 - t0)
                ret.append(t2 - t1)
                total.append(t2 - t0)
            out["single_ms"][k] = {
                "p50": 1000 * float(np.median(total)),
                "p95": 1000 * float(np.percentile(total, 95)),
                "encode_p50": 1000 * float(np.median(enc)),
                "retrieve_p50": 1000 * float(np.median(ret)),
            }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
