"""Device benchmarks for `scripts/device_check.sh`: kernel throughput against a device-to-device copy, search
speed on the built-in corpus for the "pallas" and "jnp" implementations, indexing speed, and a BERT-base
ColBERT training step in bfloat16 (step time and MFU from counted FLOPs).

    python scripts/device_bench.py --json OUT/bench.json          # on a GPU: full sizes
    python scripts/device_bench.py --json OUT/bench.json --cpu    # tiny sizes, on CPU (CI runs this)

Prints one line per measurement and writes them all to the JSON file. Times are medians over repeats, with
the device synchronised (`block_until_ready`) and compilation done before timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pallas_kernels  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense, datasheet


def _timed(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args) after one warm-up call (which compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- kernels ----------------------------------------------------------------------------------------
def kernel_cases(cpu: bool) -> dict:
    """Per kernel: a realistic shape (search stage 6 over 4,096 candidates of doclen 256, a 1M-embedding
    decompression, stage 4 over 16,384 candidates) or a tiny one on CPU."""
    if cpu:
        return dict(rows=512, docs=16, doclen=32, candidates=64, centroids=256)
    return dict(rows=1 << 20, docs=4096, doclen=256, candidates=16384, centroids=65536)


def kernel_bytes(kernel: str, shapes: dict) -> tuple[int, int]:
    """(compressed bytes read, all bytes read + written) per call, as `pallas_kernels/README.md` counts them."""
    if kernel == "decompress":
        n, dim, nbytes = shapes["n"], shapes["dim"], shapes["nbytes"]
        return n * nbytes, n * nbytes + 4 * n * dim + 4 * n * dim
    if kernel == "maxsim":
        n, L, dim, nbytes, lq = shapes["n"], shapes["L"], shapes["dim"], shapes["nbytes"], shapes["lq"]
        return n * L * nbytes, n * L * (nbytes + 4 * dim) + 4 * lq * dim + 4 * n + 4 * n
    n, L, lq = shapes["n"], shapes["L"], shapes["lq"]
    return 4 * n * L, 4 * n * L + 4 * n * L * lq + 4 * n  # codes, the S rows they select (at most), scores


def kernel_inputs(cpu: bool, nbits: int = 2, dim: int = 128, lq: int = 32) -> dict[str, tuple]:
    """Per kernel: (random device arrays, static arguments, shapes for `kernel_bytes`) at `kernel_cases`' sizes."""
    sizes = kernel_cases(cpu)
    rng = np.random.default_rng(0)
    nbytes = dim * nbits // 8
    weights = jnp.asarray(np.sort(rng.normal(scale=0.05, size=1 << nbits)).astype(np.float32))
    Q = jnp.asarray(rng.normal(size=(lq, dim)).astype(np.float32))
    cases = {}
    n = sizes["rows"]
    cases["decompress"] = (
        (
            jnp.asarray(rng.normal(size=(n, dim)).astype(np.float32)),
            jnp.asarray(rng.integers(0, 256, (n, nbytes), dtype=np.uint8)),
            weights,
        ),
        dict(nbits=nbits),
        dict(n=n, dim=dim, nbytes=nbytes),
    )
    n, L = sizes["docs"], sizes["doclen"]
    cases["maxsim"] = (
        (
            Q,
            jnp.asarray(rng.normal(size=(n, L, dim)).astype(np.float32)),
            jnp.asarray(rng.integers(0, 256, (n, L, nbytes), dtype=np.uint8)),
            weights,
            jnp.asarray(rng.integers(1, L + 1, n).astype(np.int32)),
        ),
        dict(nbits=nbits),
        dict(n=n, L=L, dim=dim, nbytes=nbytes, lq=lq),
    )
    n, P = sizes["candidates"], sizes["centroids"]
    cases["centroid_interaction"] = (
        (
            jnp.asarray(rng.normal(size=(P + 1, lq)).astype(np.float32)),
            jnp.asarray(rng.integers(0, P + 1, (n, L)).astype(np.int32)),
        ),
        {},
        dict(n=n, L=L, rows=P + 1, lq=lq),
    )
    return cases


def bench_kernels(cpu: bool) -> list[dict]:
    cases = kernel_inputs(cpu)
    repeats = 3 if cpu else 20
    results = []
    for kernel, (args, statics, shapes) in cases.items():
        compressed, total = kernel_bytes(kernel, shapes)
        buffer = jnp.zeros((total // 4,), jnp.float32) + 1.0
        copy_s = _timed(jax.jit(lambda x: x * 1.0), buffer, repeats=repeats)  # reads and writes total/2 each
        row = dict(kernel=kernel, shapes=shapes, compressed_bytes=compressed, bytes_moved=total)
        row["copy_gbps"] = 2 * buffer.nbytes / copy_s / 1e9
        for impl in ("pallas", "jnp"):
            fn = jax.jit(functools.partial(getattr(pallas_kernels, kernel), **statics, implementation=impl))
            seconds = _timed(fn, *args, repeats=repeats)
            row[impl] = dict(
                ms=seconds * 1e3, compressed_gbps=compressed / seconds / 1e9, moved_gbps=total / seconds / 1e9
            )
        results.append(row)
        print(
            f"kernel {kernel:22s} pallas {row['pallas']['ms']:8.3f} ms ({row['pallas']['moved_gbps']:7.1f} GB/s moved, "
            f"{row['pallas']['compressed_gbps']:7.1f} GB/s compressed)  jnp {row['jnp']['ms']:8.3f} ms  "
            f"copy {row['copy_gbps']:7.1f} GB/s",
            flush=True,
        )
    return results


# -- block-size sweep -------------------------------------------------------------------------------
def sweep_variants(cpu: bool) -> dict[str, list[dict]]:
    """Per kernel, the `BlockSizes` fields to try against the current table (Triton's launch parameters too on
    GPU). Powers of two only (Triton's blocks)."""
    if cpu:
        return {
            "maxsim": [dict(maxsim_docs=16), dict(maxsim_rows=256)],
            "centroid_interaction": [dict(interaction_docs=16)],
            "decompress": [dict(decompress_rows=256)],
        }
    maxsim = [
        dict(maxsim_docs=d, maxsim_rows=r) for d, r in ((4, 64), (8, 64), (32, 64), (16, 32), (16, 128), (8, 128))
    ]
    maxsim += [dict(num_warps=8), dict(num_stages=1), dict(num_stages=3), dict(maxsim_docs=8, num_warps=8)]
    interaction = [dict(interaction_docs=d) for d in (1, 2, 8, 16, 32)]
    interaction += [dict(num_warps=2), dict(num_warps=8), dict(interaction_docs=16, num_warps=8)]
    decompress = [dict(decompress_rows=r) for r in (32, 128, 256)] + [
        dict(num_warps=8),
        dict(decompress_rows=128, num_warps=8),
    ]
    return {"maxsim": maxsim, "centroid_interaction": interaction, "decompress": decompress}


def bench_sweep(cpu: bool, budget_s: float) -> list[dict]:
    """Times each kernel's Pallas path under other block sizes (the same shapes as `bench_kernels`), checks
    each variant's output against the `jnp` twin, and stops starting variants after `budget_s` seconds."""
    import dataclasses

    from pallas_kernels import dispatch

    platform = "cpu" if jax.default_backend() == "cpu" else "cuda"
    base = dispatch.BLOCK_SIZES[platform]
    cases = kernel_inputs(cpu)
    repeats = 3 if cpu else 20
    start = time.perf_counter()
    rows = []
    for kernel, variants in sweep_variants(cpu).items():
        args, statics, _ = cases[kernel]
        want = np.asarray(
            jax.jit(functools.partial(getattr(pallas_kernels, kernel), **statics, implementation="jnp"))(*args)
        )
        for change in [{}] + variants:
            if time.perf_counter() - start > budget_s:
                print(f"sweep: over {budget_s:.0f} s, stopping", flush=True)
                return rows
            blocks = dataclasses.replace(base, **change)
            row = dict(kernel=kernel, change=change or "current", blocks=dataclasses.asdict(blocks))
            dispatch.BLOCK_SIZES[platform] = blocks
            jax.clear_caches()  # the kernels' own jits key on shapes and statics, not on the block table
            try:
                fn = jax.jit(functools.partial(getattr(pallas_kernels, kernel), **statics, implementation="pallas"))
                got = np.asarray(fn(*args))
                row["max_abs_diff"] = float(np.max(np.abs(got - want))) if got.size else 0.0
                row["ms"] = _timed(fn, *args, repeats=repeats) * 1e3
            except Exception as e:  # a variant that does not compile is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                dispatch.BLOCK_SIZES[platform] = base
            rows.append(row)
            shown = f"{row['ms']:8.3f} ms, max |diff| {row['max_abs_diff']:.1e}" if "ms" in row else row["error"][:100]
            print(f"sweep {kernel:22s} {str(row['change']):55s} {shown}", flush=True)
    return rows


# -- search and indexing ----------------------------------------------------------------------------
def bench_search(cpu: bool, work: Path) -> dict:
    """Builds the built-in corpus index (a 200-passage slice on CPU) and times search for both
    implementations at k=10 and 100: queries/s for a batch, and single-query latency."""
    import colbert_jax
    from colbert_jax.default_model import default_checkpoint
    from colbert_jax.quickstart import SAMPLE_QUERIES, corpus_file

    corpus = corpus_file()
    if cpu:
        lines = corpus.read_text().splitlines()[:200]
        corpus = work / "corpus_200.tsv"
        corpus.write_text("\n".join(lines) + "\n")
    n_passages = sum(1 for _ in open(corpus))
    model = colbert_jax.load_checkpoint(default_checkpoint())
    path = work / "index"
    t0 = time.perf_counter()
    colbert_jax.Indexer(model, nbits=2, show_progress=False).index(path, corpus, overwrite=True)
    index_s = time.perf_counter() - t0
    # Again in this process: its programs are compiled now, so this one measures throughput, not compilation.
    t0 = time.perf_counter()
    colbert_jax.Indexer(model, nbits=2, show_progress=False).index(work / "index_warm", corpus, overwrite=True)
    warm_s = time.perf_counter() - t0
    out = dict(
        passages=n_passages,
        index_seconds=index_s,
        index_passages_per_s=n_passages / index_s,
        index_warm_seconds=warm_s,
        index_warm_passages_per_s=n_passages / warm_s,
        search=[],
    )
    print(
        f"indexing: {n_passages} passages in {index_s:.1f} s ({n_passages / index_s:.0f} passages/s), "
        f"again in {warm_s:.1f} s ({n_passages / warm_s:.0f} passages/s)",
        flush=True,
    )
    batch = 8 if cpu else 256
    queries = [SAMPLE_QUERIES[i % len(SAMPLE_QUERIES)] + f" {i}" for i in range(batch)]
    repeats = 2 if cpu else 5
    rankings = {}
    for impl in ("pallas", "jnp"):
        searcher = colbert_jax.Searcher(path, checkpoint=model, truncate=True, implementation=impl)
        Q = searcher.encode(queries)
        for k in (10, 100):
            searcher.search_all(list(Q), k=k)  # compiles every stage at these sizes
            batch_s = statistics.median(_wall(searcher.search_all, list(Q), k=k) for _ in range(repeats))
            singles = [Q[i % len(Q)] for i in range(4 if cpu else 50)]
            for q in singles:  # compiles the sizes these queries need, then times them warm
                searcher.search(q, k=k)
            single = [_wall(searcher.search, q, k=k) for q in singles]
            rankings[impl, k] = searcher.search_all(list(Q[:4]), k=k)
            row = dict(
                implementation=impl,
                k=k,
                batch=batch,
                queries_per_s=batch / batch_s,
                single_query_ms=statistics.median(single) * 1e3,
            )
            out["search"].append(row)
            print(
                f"search {impl:6s} k={k:3d}: {row['queries_per_s']:8.1f} queries/s (batch {batch}), "
                f"single query {row['single_query_ms']:7.2f} ms",
                flush=True,
            )
    out["same_rankings"] = all(_pids(rankings["pallas", k]) == _pids(rankings["jnp", k]) for k in (10, 100))
    print(f"search: pallas and jnp rankings equal: {out['same_rankings']}", flush=True)
    return out


def _wall(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def _pids(ranking) -> list:
    data = ranking.todict()
    return [[pid for pid, _, _ in data[q]] for q in sorted(data)]


# -- training ---------------------------------------------------------------------------------------
def train_program(bert_config, *, dim: int, queries: int, nway: int, query_len: int, doc_len: int, mesh, dtype: str):
    """The sharded training step as `colbert_jax.training.loop` builds it, over `mesh` (axes data, model).

    Returns (step, init, state_structs, batch_structs, flops): `step(state, batch)` jitted with shardings,
    `init()` -> (a real random state, a real batch), and the training FLOPs of one step (forward x 3, counted
    from the matmul shapes)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from colbert_jax.config import ColBERTConfig
    from colbert_jax.modeling.colbert import ColBERTEncoder
    from colbert_jax.training.config import TrainSettings
    from colbert_jax.training.sharding import batch_sharding, param_shardings, state_shardings
    from colbert_jax.training.step import TrainState, make_optimizer, train_step

    colbert = ColBERTConfig(
        dim=dim, nway=nway, bsize=queries, accumsteps=1, query_maxlen=query_len, doc_maxlen=doc_len, compute_dtype=dtype
    )
    settings = TrainSettings()
    module = ColBERTEncoder(bert_config, dim, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    tx = make_optimizer(colbert, settings)
    p_shard = param_shardings(module, mesh, settings.logical_axis_rules)
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract_params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids))["params"]
    abstract_params = jax.tree.map(lambda x: getattr(x, "value", x), abstract_params, is_leaf=_is_boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    s_shard = state_shardings(tx, abstract_opt, p_shard, mesh)
    replicated = NamedSharding(mesh, P())
    rows = batch_sharding(mesh)
    step = jax.jit(
        functools.partial(
            train_step,
            module=module,
            tx=tx,
            colbert=colbert,
            train=settings,
            pad_id=0,
            skiplist=jnp.zeros((1,), jnp.int32),
            distill=False,
        ),
        in_shardings=(s_shard, rows),
        out_shardings=(s_shard, replicated),
        donate_argnums=0,
    )

    def struct(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    state = TrainState(
        step=struct((), jnp.int32, replicated),
        params=jax.tree.map(lambda a, s: struct(a.shape, a.dtype, s), abstract_params, p_shard),
        opt_state=jax.tree.map(lambda a, s: struct(a.shape, a.dtype, s), abstract_opt, s_shard.opt_state),
        rng=struct((2,), jnp.uint32, replicated),
    )
    batch = {
        "q_ids": struct((1, queries, query_len), jnp.int32, rows),
        "q_mask": struct((1, queries, query_len), jnp.int32, rows),
        "d_ids": struct((1, queries * nway, doc_len), jnp.int32, rows),
        "d_mask": struct((1, queries * nway, doc_len), jnp.int32, rows),
        "scores": struct((1, queries, nway), jnp.float32, rows),
    }

    def init():
        params = jax.jit(
            lambda: jax.tree.map(
                lambda x: getattr(x, "value", x),
                module.init(jax.random.PRNGKey(0), ids, ids)["params"],
                is_leaf=_is_boxed,
            ),
            out_shardings=p_shard,
        )()
        real = TrainState(
            jax.device_put(jnp.int32(0), replicated),
            params,
            jax.jit(tx.init, out_shardings=s_shard.opt_state)(params),
            jax.device_put(jax.random.PRNGKey(0), replicated),
        )
        rng = np.random.default_rng(0)
        data = {}
        for name, s in batch.items():
            if name.endswith("ids"):
                value = rng.integers(1000, bert_config.vocab_size, s.shape).astype(np.int32)
            elif name.endswith("mask"):
                value = np.ones(s.shape, np.int32)
            else:
                value = np.zeros(s.shape, np.float32)
            data[name] = jax.device_put(value, s.sharding)
        return real, data

    h, f, layers = bert_config.hidden_size, bert_config.intermediate_size, bert_config.num_hidden_layers

    def forward(seqs, length):
        per_token = layers * (2 * 4 * h * h + 2 * 2 * h * f + 2 * 2 * length * h) + 2 * h * dim
        return seqs * length * per_token

    flops = 3.0 * (forward(queries, query_len) + forward(queries * nway, doc_len))
    return step, init, state, batch, flops


def _is_boxed(x) -> bool:
    return hasattr(x, "unbox")


def bench_train(cpu: bool) -> dict:
    from colbert_jax.modeling.bert import BertConfig
    from colbert_jax.training.config import MeshSettings
    from colbert_jax.training.sharding import make_mesh

    if cpu:
        bert = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        shape = dict(queries=4, nway=2, query_len=32, doc_len=64)
    else:  # BERT-base, colbert-ai's ColBERTv2 shapes (query 32, doc 180 -> 192 tokens) with nway 2
        bert = BertConfig()
        shape = dict(queries=64, nway=2, query_len=32, doc_len=192)
    mesh = make_mesh(MeshSettings())
    step, init, _, _, flops = train_program(bert, dim=128, mesh=mesh, dtype="bfloat16", **shape)
    state, batch = init()
    state, metrics = step(state, batch)  # compiles
    jax.block_until_ready(metrics)
    times = []
    for _ in range(2 if cpu else 10):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
    peak = peak * jax.device_count() if peak else None
    out = dict(
        model="tiny BERT" if cpu else "BERT-base",
        **shape,
        dtype="bfloat16",
        step_ms=seconds * 1e3,
        tflops=flops / seconds / 1e12,
        mfu=(flops / seconds / peak) if peak else None,
        device_kind=kind,
    )
    mfu = f"{out['mfu']:.1%}" if out["mfu"] is not None else "n/a (unknown peak)"
    print(f"training step ({out['model']}, bf16): {out['step_ms']:.1f} ms, {out['tflops']:.1f} TFLOP/s, MFU {mfu}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--work", default=None, help="scratch directory (index); default: next to --json")
    parser.add_argument("--cpu", action="store_true", help="tiny sizes, for CPU")
    parser.add_argument(
        "--only", default="kernels,search,train", help="comma-separated parts: kernels, sweep, search, train"
    )
    parser.add_argument("--sweep-seconds", type=float, default=150, help="the sweep starts no variant after this")
    parser.add_argument("--merge", action="store_true", help="add to the results already in --json")
    args = parser.parse_args(argv)
    work = Path(args.work or Path(args.json).parent / "work")
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.only.split(","))
    result = json.loads(Path(args.json).read_text()) if args.merge and Path(args.json).is_file() else {}
    result.update(backend=jax.default_backend(), devices=[d.device_kind for d in jax.devices()], jax=jax.__version__)
    print(f"device_bench: {result['backend']} {result['devices']} jax {result['jax']}", flush=True)
    failures = []
    for name, fn in (
        ("kernels", lambda: bench_kernels(args.cpu)),
        ("sweep", lambda: bench_sweep(args.cpu, args.sweep_seconds)),
        ("search", lambda: bench_search(args.cpu, work)),
        ("train", lambda: bench_train(args.cpu)),
    ):
        if name not in parts:
            continue
        try:
            result[name] = fn()
        except Exception as e:  # one part's failure is reported, the others still run
            result[name] = dict(error=f"{type(e).__name__}: {e}")
            failures.append(name)
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
