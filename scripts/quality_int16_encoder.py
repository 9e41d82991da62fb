"""Would int16 products hold the query encoder's quality? A simulation of an encoder whose dense products run on
int16 operands (AVX-512 VNNI's `vpdpwssd`: two int16 products a lane an instruction, the rate of `vdpbf16ps`
and 1.5x that of the shipped two-term int8 encoder's three int8 products; `scripts/bench_cpu_peak.py`), against
float32 encoding, beside the shipped bf16 and int8 encoders.

Each activation row x is quantized with its own scale (codes rint(x * MX / max|x|), within [-MX, MX]), each
weight column likewise with MW, and the integer products are summed exactly in int32 over passes of --depth
coordinates (MX * MW * depth < 2^31: no pass can overflow), the passes' sums added in float32, then scaled. The
simulation stands in for every product the bf16 encoder runs on bfloat16 operands (attention's projections and
the MLP's; XLA computes it, so the GELU after the MLP's first product is XLA's, which has the native GELU's
bits); attention's scores, GELU and LayerNorms stay float32, as in the bf16 encoder.

    python scripts/quality_int16_encoder.py --index INDEX --queries QUERIES.tsv [--variants 4095x4095,8191x2047]

Prints, per encoder, the worst and mean cosine of each query's embeddings to float32's and the overlap@10 of
PLAID's rankings (the searcher's defaults) with float32 encoding's rankings: issue 14's encoder bar is cosine
>= 0.999 and overlap@10 >= 0.99.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np


def int16_product(mx: int, mw: int, depth: int):
    """x [..., K] . kernel [K, N] on int16 codes (per-row and per-column scales), int32 sums per pass."""
    import jax
    import jax.numpy as jnp

    if mx * mw * depth >= 2**31:
        raise ValueError(f"{mx} x {mw} x {depth} can overflow an int32 pass")

    def product(x, p):
        w = jnp.asarray(p["kernel"], jnp.float32)
        x = x.astype(jnp.float32)
        sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / mx
        sx = jnp.where(sx > 0, sx, 1.0)
        xq = jnp.clip(jnp.round(x / sx), -mx, mx).astype(jnp.int32)
        sw = jnp.max(jnp.abs(w), axis=0) / mw
        sw = jnp.where(sw > 0, sw, 1.0)
        wq = jnp.clip(jnp.round(w / sw), -mw, mw).astype(jnp.int32)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        acc = None
        for k0 in range(0, w.shape[0], depth):
            part = jax.lax.dot_general(
                xq[..., k0 : k0 + depth], wq[k0 : k0 + depth], dims, preferred_element_type=jnp.int32
            ).astype(jnp.float32)
            acc = part if acc is None else acc + part
        return acc * sx * sw

    return product


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="qid \\t text TSV")
    ap.add_argument("--variants", default="4095x4095,8191x2047,2047x2047", help="MXxMW, comma-separated")
    ap.add_argument("--depth", type=int, default=128, help="coordinates summed in int32 per pass")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*truncated.*")
    import jax

    import colbert_jax
    from colbert_jax import native
    from colbert_jax.modeling import quantize
    from colbert_jax.queries import load_queries

    texts = list(load_queries(args.queries).values())
    searcher = colbert_jax.Searcher(args.index, truncate=True)
    model = searcher.model
    encoders = {q: model.replace_config(query_quantization=q) for q in ("none", "bf16", "int8")}
    embeddings = {name: np.asarray(m.encode_queries(texts)) for name, m in encoders.items()}
    saved = (quantize._product, quantize._qkv_product, native.gelu_faster_than_xla)
    try:
        for variant in args.variants.split(","):
            mx, mw = (int(v) for v in variant.split("x"))
            simulated = int16_product(mx, mw, args.depth)

            def product(x, p, simulated=simulated):
                return simulated(x, p) if quantize.PACKED_BF16 in p else saved[0](x, p)

            quantize._product = product
            quantize._qkv_product = lambda x, p, key_bias, product=product: product(x, p)
            native.gelu_faster_than_xla = lambda: False  # the product, then XLA's GELU
            jax.clear_caches()
            embeddings[f"int16 {variant}"] = np.asarray(encoders["bf16"].encode_queries(texts))
    finally:
        quantize._product, quantize._qkv_product, native.gelu_faster_than_xla = saved
        jax.clear_caches()

    def cosine(a, b):
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    tops = {}
    for name, Q in embeddings.items():
        ranking = searcher.search_all(list(Q), k=10).todict()
        tops[name] = [{p for p, _, _ in ranking[i]} for i in range(len(texts))]
    print(f"{len(texts)} queries, {args.index}; int16 passes of {args.depth} coordinates")
    print("| encoder | worst cosine to float32 | mean cosine | PLAID overlap@10 with float32's |")
    print("|---|---|---|---|")
    for name, Q in embeddings.items():
        if name == "none":
            continue
        c = cosine(embeddings["none"], Q)
        overlap = np.mean([len(a & b) / 10 for a, b in zip(tops["none"], tops[name])])
        print(f"| {name} | 1 - {1 - c.min():.1e} | 1 - {1 - c.mean():.1e} | {overlap:.4f} |")


if __name__ == "__main__":
    main()
