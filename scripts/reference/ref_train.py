"""Time colbert-ai's trainer (CPU) and print per-step times as JSON. Run with the reference venv's python.

    ref_train.py --checkpoint DIR --triples JSONL --queries TSV --collection TSV --bsize 8 --nway 2 \
        --doc-maxlen 64 --query-maxlen 32 --steps 20

Runs `colbert.training.training.train` in this process with a one-process gloo group. Two harness changes,
neither touching the math: colbert-ai wraps the model in DistributedDataParallel with a GPU device id,
which torch refuses for a CPU module, so the wrapper is given no device ids; and its per-step log call is
timed (that is when each step ends).
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/colbert-torch-ext")


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("checkpoint", "triples", "queries", "collection"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--bsize", type=int, default=8)
    ap.add_argument("--nway", type=int, default=2)
    ap.add_argument("--doc-maxlen", type=int, default=64)
    ap.add_argument("--query-maxlen", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import torch
    import torch.distributed as dist
    from colbert.infra import ColBERTConfig
    from colbert.training import training

    work = tempfile.mkdtemp(prefix="ref-train-")
    os.chdir(work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ddp = torch.nn.parallel.DistributedDataParallel
    training.torch.nn.parallel.DistributedDataParallel = lambda module, **kw: ddp(module, find_unused_parameters=True)
    ends = []
    log = training.print_message

    def timed(*a, **kw):
        if a and isinstance(a[0], int):
            ends.append(time.perf_counter())
        return log(*a, **kw)

    training.print_message = timed
    config = ColBERTConfig(
        checkpoint=args.checkpoint,
        bsize=args.bsize,
        nway=args.nway,
        doc_maxlen=args.doc_maxlen,
        query_maxlen=args.query_maxlen,
        lr=args.lr,
        maxsteps=args.steps,
        rank=0,
        nranks=1,
        root=work,
        experiment="bench",
        name="bench",
    )
    training.train(config, args.triples, args.queries, args.collection)
    steps = [b - a for a, b in zip(ends, ends[1:])]
    print("RESULT " + json.dumps({"step_seconds": steps, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    sys.exit(main())
