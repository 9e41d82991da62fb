"""Training speed: colbert-jax vs colbert-ai's trainer on the same model, data, batch and sequence lengths.

    python scripts/bench_train.py [--steps 20] [--bsize 8] [--nway 2] [--doc-maxlen 64]
        [--ref-python /tmp/colbert-ref-venv/bin/python] [--bf16]

Model: the packaged MiniLM ColBERT checkpoint; data: tests/fixtures/training (real docstring triples).
Each system runs in a fresh process; the step time is the median over steps 3..N (wall time per step,
tokenisation included), so start-up and compilation are excluded. --bf16 adds our bfloat16-compute run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_index import run  # noqa: E402

OURS = """
import json, sys
from colbert_jax.training.config import TrainConfig
from colbert_jax.training.loop import train
out, overrides = sys.argv[1], sys.argv[2:]
train(TrainConfig.load("configs/tiny.yaml", overrides), out, show_progress=False)
steps = [json.loads(l)["seconds"] for l in open(out + "/metrics.jsonl")]
print("RESULT " + json.dumps({"step_seconds": steps}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bsize", type=int, default=8)
    ap.add_argument("--nway", type=int, default=2)
    ap.add_argument("--doc-maxlen", type=int, default=64)
    ap.add_argument("--query-maxlen", type=int, default=32)
    ap.add_argument("--bf16", action="store_true", help="also run ours with compute_dtype=bfloat16")
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "/tmp/colbert-ref-venv/bin/python"))
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    from colbert_jax.default_model import default_checkpoint

    checkpoint = str(default_checkpoint())
    data = REPO / "tests" / "fixtures"
    common = [
        f"checkpoint={checkpoint}",
        f"bsize={args.bsize}",
        f"nway={args.nway}",
        f"doc_maxlen={args.doc_maxlen}",
        f"query_maxlen={args.query_maxlen}",
        f"maxsteps={args.steps}",
        "train.save_every=null",
        "train.export=false",
        "train.shuffle=false",
        "warmup=null",
        "lr=3e-5",
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    env = {"PYTHONPATH": str(REPO)}
    results = {"colbert-jax": run([sys.executable, "-c", OURS, str(work / "fp32"), *common], env=env)}
    if args.bf16:
        results["colbert-jax bf16"] = run(
            [sys.executable, "-c", OURS, str(work / "bf16"), *common, "compute_dtype=bfloat16"], env=env
        )
    if not args.skip_reference:
        results["colbert-ai"] = run(
            [
                args.ref_python,
                str(REPO / "scripts/reference/ref_train.py"),
                "--checkpoint",
                checkpoint,
                "--triples",
                str(data / "training/triples.jsonl"),
                "--queries",
                str(data / "training/queries.tsv"),
                "--collection",
                str(data / "collections/stdlib_2k.tsv"),
                "--bsize",
                str(args.bsize),
                "--nway",
                str(args.nway),
                "--doc-maxlen",
                str(args.doc_maxlen),
                "--query-maxlen",
                str(args.query_maxlen),
                "--steps",
                str(args.steps),
            ]
        )
    cpu = platform.processor() or platform.machine()
    print(
        f"\nMiniLM-L6 ColBERT, bsize={args.bsize}, nway={args.nway}, doc_maxlen={args.doc_maxlen}, "
        f"query_maxlen={args.query_maxlen}, {cpu}, {os.cpu_count()} CPUs\n"
    )
    print("| system | median step ms | examples/s |\n|---|---|---|")
    medians = {}
    for name, r in results.items():
        medians[name] = float(np.median(r["step_seconds"][2:]))
        print(f"| {name} | {1000 * medians[name]:.0f} | {args.bsize / medians[name]:.1f} |")
    if "colbert-ai" in medians:
        print(f"\nexamples/s: {medians['colbert-ai'] / medians['colbert-jax']:.2f}x colbert-ai's")


if __name__ == "__main__":
    main()
