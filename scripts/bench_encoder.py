"""Query encoding speed on CPU: colbert-jax at float32, bfloat16 (`compute_dtype`), int8 (`query_quantization=
"int8"`), float32 with its dense products on bfloat16 operands (`query_quantization="bf16"`: "bf16 products") or
on int16 operands (`query_quantization="int16"`: "int16 products"), and float32 with the native kernels off (XLA
alone), against colbert-ai's encoder (torch), side by side, on the same checkpoint and query texts.

    python scripts/bench_encoder.py [--queries 500] [--repeats 3] [--ref-python /work/refvenv/bin/python]
                                    [--index DIR [--index-queries TSV]] [--checkpoint DIR] [--variants ...]

Checkpoint: the packaged MiniLM (default model), or --checkpoint, a ColBERT checkpoint both libraries load
(colbert-ai's layout: e.g. BERT-base with random weights from `scripts/bench_backbones.py --build`; speed does
not depend on the weights); --variants picks our rows (default: all). Queries: the first 4-9 words of seeded
random passages of the built-in corpus (as `scripts/bench_search.py` draws them). Each repeat runs every
system in a fresh process, one after the other (a noisy machine slows neighbours alike); per system:
single-query encoding p50 (one text at a time, tokenisation included) and batched ms per query (all queries in
batches of 64, median of 3 passes).
Prints medians over repeats with their min-max spread, ratios to colbert-ai, and, with --index (an index by
the default model: of the built-in corpus for the bench queries, or of the collection --index-queries was
written for, e.g. tests/fixtures/collections/stdlib_2k.tsv with queries_2k.tsv), each variant's worst query
cosine to float32's embeddings and PLAID's overlap@10 of its rankings with float32's. Two rows give that
metric's noise floor: colbert-ai's own float32 embeddings (torch), and ours at batch size 1 instead of 64.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_search import write_queries  # noqa: E402

OURS = """
import json, sys, time
import numpy as np
import colbert_jax
from colbert_jax.default_model import default_checkpoint
texts = [line.split("\\t", 1)[1] for line in open(sys.argv[1]).read().splitlines()]
settings = json.loads(sys.argv[2])
model = colbert_jax.load_checkpoint(sys.argv[3] if len(sys.argv) > 3 else str(default_checkpoint()))
if settings:
    model = model.replace_config(**settings)
model.encode_queries(texts, bsize=64)  # compiles every batch shape used below
model.encode_queries(texts[:1])
single = []
for t in texts[:200]:
    t0 = time.perf_counter(); model.encode_queries([t]); single.append(time.perf_counter() - t0)
batched = []
for _ in range(3):
    t0 = time.perf_counter(); model.encode_queries(texts, bsize=64); batched.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({"single_ms": 1000 * float(np.median(single)),
                              "batched_ms": 1000 * float(np.median(batched)) / len(texts)}))
"""

REF = """
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as scripts/reference/ref_search.py runs it
import numpy as np, torch
from colbert.infra import ColBERTConfig
from colbert.modeling.checkpoint import Checkpoint
texts = [line.split("\\t", 1)[1] for line in open(sys.argv[1]).read().splitlines()]
ckpt = Checkpoint(sys.argv[2], colbert_config=ColBERTConfig())
with torch.inference_mode():
    if len(sys.argv) > 3:  # its float32 embeddings of these queries, for the overlap's noise floor
        np.save(sys.argv[3], ckpt.queryFromText(texts, bsize=64).float().numpy())
        sys.exit(0)
    ckpt.queryFromText(texts, bsize=64); ckpt.queryFromText(texts[:1])
    single = []
    for t in texts[:200]:
        t0 = time.perf_counter(); ckpt.queryFromText([t]); single.append(time.perf_counter() - t0)
    batched = []
    for _ in range(3):
        t0 = time.perf_counter(); ckpt.queryFromText(texts, bsize=64); batched.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({"single_ms": 1000 * float(np.median(single)),
                              "batched_ms": 1000 * float(np.median(batched)) / len(texts)}))
"""

_FLOAT = {"query_quantization": "none"}
VARIANTS = {
    "float32": _FLOAT,
    "bfloat16": {**_FLOAT, "compute_dtype": "bfloat16"},
    "int8": {"query_quantization": "int8"},
    "bf16 products": {"query_quantization": "bf16"},
    "int16 products": {"query_quantization": "int16"},
}
# Timed only (an environment, not a setting): float32 with the native kernels off, XLA running the whole encoder,
# to judge `native.dense_f32_vectorized()`'s gate on this CPU against the "float32" row.
ENV_VARIANTS = {"float32, XLA only (COLBERT_JAX_NATIVE=0)": (_FLOAT, {"COLBERT_JAX_NATIVE": "0"})}


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{cmd[:3]} failed:\n{out.stderr[-3000:]}")


def overlaps(index: str, queries: Path, reference: np.ndarray | None) -> dict[str, tuple[float, float]]:
    """{variant: (worst query cosine to float32's embeddings, PLAID overlap@10 with float32's rankings)}."""
    import colbert_jax
    from colbert_jax.queries import load_queries

    texts = list(load_queries(queries).values())
    searcher = colbert_jax.Searcher(index, truncate=True)
    embeddings = {name: searcher.model.replace_config(**s).encode_queries(texts) for name, s in VARIANTS.items()}
    # (the searcher's own model is "auto": int8 where the CPU makes int8 products fast)
    embeddings["float32, batch size 1"] = searcher.model.replace_config(**_FLOAT).encode_queries(texts, bsize=1)
    if reference is not None:
        embeddings["colbert-ai float32"] = reference
    return {name: (cosine.min(), overlap) for name, (cosine, overlap) in agreement(searcher, embeddings).items()}


def agreement(searcher, embeddings: dict[str, np.ndarray], base: str = "float32") -> dict[str, tuple]:
    """{name: (each query's cosine to `base`'s embeddings [n], PLAID overlap@10 with `base`'s rankings)} for
    query embeddings [n, Lq, dim] by name (`base` among them)."""
    n = len(embeddings[base])
    flat_base = embeddings[base].reshape(n, -1)
    top = {}
    for name, q in {base: embeddings[base], **embeddings}.items():
        ranking = searcher.search_all(list(q), k=10).todict()
        top[name] = [{p for p, _, _ in ranking[i]} for i in range(n)]
    out = {}
    for name, q in embeddings.items():
        flat = q.reshape(n, -1)
        cosine = (flat * flat_base).sum(1) / (np.linalg.norm(flat, axis=1) * np.linalg.norm(flat_base, axis=1))
        out[name] = (cosine, float(np.mean([len(a & b) / 10 for a, b in zip(top[base], top[name])])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", "/tmp/colbert-ref-venv/bin/python"))
    ap.add_argument("--index", help="an index by the default model: also report cosines and overlap@10")
    ap.add_argument("--index-queries", help="queries TSV for the --index figures (default: the bench queries)")
    ap.add_argument("--json", help="also write every run's figures (and the quality figures) here")
    ap.add_argument("--checkpoint", help="a ColBERT checkpoint (colbert-ai layout) instead of the packaged MiniLM")
    names = [*VARIANTS, *ENV_VARIANTS]
    ap.add_argument("--variants", nargs="+", choices=names, default=names, metavar="NAME", help=f"of {names}")
    args = ap.parse_args()
    from colbert_jax.default_model import default_checkpoint
    from colbert_jax.quickstart import corpus_file

    work = Path(tempfile.mkdtemp(prefix="bench-encoder-"))
    queries = work / "queries.tsv"
    write_queries(corpus_file(), queries, args.queries)
    if args.index and args.checkpoint:
        ap.error("--index's figures are for the packaged model's index: not with --checkpoint")
    checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else str(default_checkpoint())
    ours = {name: (s, None) for name, s in VARIANTS.items()} | ENV_VARIANTS
    ours = {name: ours[name] for name in args.variants}
    systems = {}
    for name, (settings, env) in ours.items():
        systems[name] = ([sys.executable, "-c", OURS, str(queries), json.dumps(settings), checkpoint], env)
    if Path(args.ref_python).exists():
        systems["colbert-ai"] = ([args.ref_python, "-c", REF, str(queries), checkpoint], None)
    results: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, (cmd, env) in systems.items():
            results[name].append(run(cmd, env))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(
        f"{cpu}, {os.cpu_count()} CPUs, {platform.python_version()}; {args.queries} queries, {args.repeats} repeats; "
        f"checkpoint {args.checkpoint or 'the packaged MiniLM'}"
    )
    from colbert_jax import native

    auto = {
        "int8_over_f32_rate": native.int8_over_f32_rate(),
        "bf16_over_f32_rate": native.bf16_over_f32_rate(),
        "int16_over_f32_rate": native.int16_over_f32_rate(),
        "amx_tiles": native.int8_tiles(),
        "order": list(native.query_products_by_speed()),
        "measured": native.measured_rates(),  # the probes' raw readings; the rates above are them rounded
    }
    print(
        f"rates over float32 (one core): int8 {auto['int8_over_f32_rate']:.2f}, bf16 {auto['bf16_over_f32_rate']:.2f}"
        f", int16 {auto['int16_over_f32_rate']:.2f} (read "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(auto["measured"].items()))
        + f"); AMX tiles {auto['amx_tiles']}"
        f"; auto's order: {', '.join(auto['order'])}"
    )
    print("| encoder | single query p50 ms | batched ms/query | vs colbert-ai (single, batched) |")
    print("|---|---|---|---|")
    ref = results.get("colbert-ai")
    for name, rows in results.items():
        cells = []
        for key in ("single_ms", "batched_ms"):
            v = [r[key] for r in rows]
            cells.append(f"{np.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
        ratio = ""
        if ref:
            ratio = ", ".join(
                f"{np.median([r[key] for r in rows]) / np.median([r[key] for r in ref]):.2f}x"
                for key in ("single_ms", "batched_ms")
            )
        print(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    qualities: dict[str, dict] = {}
    if args.index:
        quality = Path(args.index_queries) if args.index_queries else queries
        reference = None
        if Path(args.ref_python).exists():
            dump = work / "colbert-ai.npy"
            subprocess.run([args.ref_python, "-c", REF, str(quality), str(default_checkpoint()), str(dump)], check=True)
            reference = np.load(dump)
        print(f"against float32 on {quality.name}: | encoder | worst query cosine | PLAID overlap@10 |")
        for name, (cosine, overlap) in overlaps(args.index, quality, reference).items():
            print(f"| {name} | 1 - {max(0.0, 1 - cosine):.1e} | {overlap:.4f} |")  # float rounding: cosine 1 + 1e-7
            qualities[name] = {"worst_cosine": float(cosine), "overlap_at_10": overlap}
    if args.json:
        report = {"cpu": cpu, "auto": auto, "runs": results, "quality": qualities}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
