"""The query encoder's intermediate layer with its bias and GELU in the product's epilogue (`gelu_bias=` of
`native.dense_bf16` and `native.int8_dense`) against the product then the separate GELU kernel (`native.gelu`),
in one process, alternated call by call (kernels) and round by round (encoders), outputs compared bit for bit.

    python scripts/bench_gelu_epilogue.py [--products bf16 int8] [--rounds 12] [--calls 40]

Kernels: x [rows, 384] . w [384, 1536] with bias and GELU, rows 32 (one query) and 2048 (a batch of 64), and
the product alone for scale; medians (fastest) of the calls. Encoders (bf16 only: the encoder does not fuse
int8's GELU, which made one query slower on AVX-512 VNNI): the packaged MiniLM with `query_quantization="bf16"`,
512 bench-style queries (as `scripts/bench_encoder.py` draws them), batched (bsize 64) ms a query and
single-query p50 over 50 queries, per round; the separate-kernel encoder is the same model traced with
`native.dense_bf16` wrapped to ignore `gelu_bias` and call `native.gelu` after it. Needs AVX-512 (bf16: AVX-512
BF16; int8: AMX or AVX-512 VNNI).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def _median_ms(times: list[float]) -> str:
    return f"{1e3 * float(np.median(times)):.3f} ({1e3 * min(times):.3f})"


def kernels(products: str, calls: int) -> None:
    import jax
    import jax.numpy as jnp

    from colbert_jax import native
    from colbert_jax.modeling.quantize import _quantize_kernel

    rng = np.random.default_rng(0)
    k, n = 384, 1536
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    bias = jnp.asarray((0.3 * rng.standard_normal(n)).astype(np.float32))
    if products == "bf16":
        packed = jnp.asarray(native.pack_dense_bf16(w))

        def product(x, **kw):
            return native.dense_bf16(x, packed, n, **kw)
    else:
        high, cross, scale = _quantize_kernel(w)
        terms = native.pack_dense(high, cross[:k])
        implementation = "amx" if native.amx_available() else "vnni"

        def product(x, **kw):
            return native.int8_dense(x, *terms, scale, implementation=implementation, **kw)

    fns = {
        "product alone": jax.jit(lambda x: product(x)),
        "product, then the GELU kernel": jax.jit(lambda x: native.gelu(product(x), bias)),
        "GELU in the epilogue": jax.jit(lambda x: product(x, gelu_bias=bias)),
    }
    print(f"{products} products\n\n| rows | variant | median ms (fastest) |\n|---|---|---|")
    for rows in (32, 2048):
        x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
        outs = {name: np.asarray(f(x)) for name, f in fns.items()}
        assert np.array_equal(outs["product, then the GELU kernel"], outs["GELU in the epilogue"]), "bits differ"
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(calls * (8 if rows == 32 else 1)):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f(x).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        for name in fns:
            print(f"| {rows} | {name} | {_median_ms(times[name])} |")


def encoders(products: str, rounds: int) -> None:
    from bench_search import write_queries

    import colbert_jax
    from colbert_jax import native
    from colbert_jax.default_model import default_checkpoint
    from colbert_jax.quickstart import corpus_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "queries.tsv"
        write_queries(corpus_file(), path, 512)
        texts = [line.split("\t", 1)[1] for line in path.read_text().splitlines()]
    attribute = "dense_bf16" if products == "bf16" else "int8_dense"
    fused = getattr(native, attribute)

    def separate(*args, gelu_bias=None, **kwargs):
        y = fused(*args, **kwargs)
        return y if gelu_bias is None else native.gelu(y, gelu_bias)

    models = {}
    for name, fn in (("product, then the GELU kernel", separate), ("GELU in the epilogue", fused)):
        setattr(native, attribute, fn)  # read when the encoder is traced, below
        model = colbert_jax.load_checkpoint(str(default_checkpoint())).replace_config(query_quantization=products)
        model.encode_queries(texts, bsize=64)
        model.encode_queries(texts[:1])
        models[name] = model
    setattr(native, attribute, fused)
    ids, mask = models["GELU in the epilogue"].query_tokenizer.tensorize(texts)
    a, b = (m.encode_query_ids(ids, mask, bsize=64) for m in models.values())
    assert np.array_equal(a, b), "the two encoders' embeddings differ"
    batched: dict[str, list[float]] = {name: [] for name in models}
    single: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.encode_query_ids(ids, mask, bsize=64)
            batched[name].append((time.perf_counter() - t0) / len(texts))
            one = []
            for text in texts[:50]:
                t0 = time.perf_counter()
                model.encode_queries([text])
                one.append(time.perf_counter() - t0)
            single[name].append(float(np.median(one)))
    print("\n| encoder | batched ms/query, median (min-max) | single-query p50 ms, median (min-max) |\n|---|---|---|")
    for name in models:
        bt, st = 1e3 * np.array(batched[name]), 1e3 * np.array(single[name])
        print(
            f"| {name} | {np.median(bt):.3f} ({bt.min():.3f}-{bt.max():.3f}) "
            f"| {np.median(st):.3f} ({st.min():.3f}-{st.max():.3f}) |"
        )
    print("(embeddings bit-identical)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", nargs="+", choices=["bf16", "int8"], default=["bf16"], help="the encoders")
    ap.add_argument("--rounds", type=int, default=12, help="alternated encoder rounds")
    ap.add_argument("--calls", type=int, default=40, help="alternated kernel calls at 2048 rows (8x at 32)")
    args = ap.parse_args()
    from colbert_jax import native

    if not (native.enabled() and native.gelu_faster_than_xla()):
        raise SystemExit("needs the native kernels built for AVX-512 (where the encoder fuses the GELU)")
    for products in args.products:
        if products == "bf16" and not native.dense_bf16_vectorized():
            raise SystemExit("bf16: needs AVX-512 BF16 (dense_bf16's vector path)")
        if products == "int8" and not (native.amx_available() or native.int8_vnni_available()):
            raise SystemExit("int8: needs AMX or AVX-512 VNNI")
        kernels(products, args.calls)
        if products == "bf16":  # the encoder fuses bf16's GELU only (int8's measured slower for one query)
            encoders(products, args.rounds)
        print()


if __name__ == "__main__":
    main()
