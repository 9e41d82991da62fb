"""Fused residual decompression + MaxSim over candidate documents, as a Pallas kernel.

For each candidate document (rows padded to L): decompress its embeddings, take the dot product with
every query vector, mask padded rows (-9999, colbert-ai's fill), max over the document's rows, sum over
query vectors. `maxsim_reference` is the plain `jnp` definition; `maxsim` computes the same, in the kernel
or with the reference (`implementation`, see `pallas_kernels.dispatch`).

The kernel: each program scores `maxsim_docs` documents with the (padded) query block resident; it walks
them in tiles of `maxsim_rows` embedding rows (several short documents per tile, or a long document over
several tiles with a running maximum), so decompressed vectors never go back to memory and every tile is
one [rows, dim] x [dim, Lq] matmul. That matmul runs at float32 precision (`Precision.HIGHEST`: IEEE
float32 in Triton, not TF32), so scores match the reference to float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.decompress import decompress_reference, decompress_tile
from pallas_kernels.dispatch import BLOCK_SIZES, MIN_DOT, compiler_params, per_platform, pow2, resolve

__all__ = ["maxsim", "maxsim_reference", "MASKED"]

MASKED = -9999.0


def maxsim_reference(
    Q: jax.Array,
    centroid_rows: jax.Array,
    residuals: jax.Array,
    weights: jax.Array,
    lengths: jax.Array,
    *,
    nbits: int,
    clamp: bool = False,
) -> jax.Array:
    """Q [Lq, dim]; centroid_rows [n, L, dim]; residuals uint8 [n, L, dim*nbits/8]; weights [2^nbits];
    lengths int [n] -> scores float32 [n]. `clamp` floors each query vector's maximum at 0."""
    n, L, dim = centroid_rows.shape
    D = decompress_reference(centroid_rows.reshape(n * L, dim), residuals.reshape(n * L, -1), weights, nbits=nbits)
    sim = jnp.einsum("qd,nld->nlq", Q.astype(jnp.float32), D.reshape(n, L, dim), precision=jax.lax.Precision.HIGHEST)
    mask = jnp.arange(L)[None, :, None] < lengths[:, None, None]
    per_token = jnp.where(mask, sim, MASKED).max(axis=1)
    return (jnp.maximum(per_token, 0.0) if clamp else per_token).sum(axis=1)


def _maxsim_kernel(
    q_ref,
    c_ref,
    r_ref,
    w_ref,
    len_ref,
    o_ref,
    *,
    nbits: int,
    dim: int,
    lq: int,
    doclen: int,
    docs: int,
    rows: int,
    clamp: bool,
):
    """One program: `o_ref.shape[0]` documents of `doclen` rows. A tile holds `rows` rows of each of `docs`
    documents: whole documents when several fit (rows == doclen), else one document split over
    doclen // rows tiles."""
    q = q_ref[...]  # [lqp, dp], loaded once per program
    lqp = q.shape[0]
    tile = docs * rows
    token = jax.lax.broadcasted_iota(jnp.int32, (docs, lqp), 1) < lq

    def group(i, carry):
        lengths = len_ref[pl.ds(i * docs, docs)]

        def chunk(j, best):
            start = pl.multiple_of(i * docs * doclen + j * rows, tile)
            D = decompress_tile(c_ref[pl.ds(start, tile), :], r_ref[pl.ds(start, tile), :], w_ref, nbits=nbits, dim=dim)
            sim = jax.lax.dot_general(
                D, q, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
            ).reshape(docs, rows, lqp)
            pos = j * rows + jax.lax.broadcasted_iota(jnp.int32, (docs, rows, lqp), 1)
            sim = jnp.where(pos < lengths[:, None, None], sim, MASKED)
            return jnp.maximum(best, jnp.max(sim, axis=1))

        best = jax.lax.fori_loop(0, doclen // rows, chunk, jnp.full((docs, lqp), MASKED, jnp.float32))
        if clamp:
            best = jnp.maximum(best, 0.0)
        o_ref[pl.ds(i * docs, docs)] = jnp.sum(jnp.where(token, best, 0.0), axis=1)  # padded query rows: 0
        return carry

    jax.lax.fori_loop(0, o_ref.shape[0] // docs, group, 0)


def _maxsim_call(platform: str, Q, centroid_rows, residuals, weights, lengths, *, nbits: int, clamp: bool):
    blocks = BLOCK_SIZES[platform]
    n, L, dim = centroid_rows.shape
    lq = Q.shape[0]
    nbytes = residuals.shape[2]
    Lp, dp, bp, lqp = pow2(L), pow2(dim, MIN_DOT), pow2(nbytes, MIN_DOT), pow2(lq, MIN_DOT)
    # Documents per program: at most the table's, at least enough for one 16-row tile.
    block = max(min(blocks.maxsim_docs, pow2(n)), pow2(-(-MIN_DOT // Lp)))
    # Rows per tile shrink as the tile's rows widen (dim, query length past 128), so that the values one
    # tile holds (decompressed rows and their scores) stay within the table's budget.
    tile = min(max(MIN_DOT, blocks.maxsim_rows * 128 // max(dp, lqp, 128)), block * Lp)
    docs, rows = max(1, tile // Lp), min(Lp, tile)
    padded = -(-n // block) * block
    q = jnp.pad(Q, ((0, lqp - lq), (0, dp - dim)))
    c = jnp.pad(centroid_rows, ((0, padded - n), (0, Lp - L), (0, dp - dim))).reshape(padded * Lp, dp)
    r = jnp.pad(residuals, ((0, padded - n), (0, Lp - L), (0, bp - nbytes))).reshape(padded * Lp, bp)
    lens = jnp.pad(jnp.minimum(lengths, L), (0, padded - n))
    kernel = functools.partial(
        _maxsim_kernel, nbits=nbits, dim=dim, lq=lq, doclen=Lp, docs=docs, rows=rows, clamp=clamp
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded,), jnp.float32),
        grid=(padded // block,),
        in_specs=[
            pl.BlockSpec((lqp, dp), lambda i: (0, 0)),
            pl.BlockSpec((block * Lp, dp), lambda i: (i, 0)),
            pl.BlockSpec((block * Lp, bp), lambda i: (i, 0)),
            pl.BlockSpec((1 << nbits,), lambda i: (0,)),
            pl.BlockSpec((block,), lambda i: (i,)),
        ],
        out_specs=pl.BlockSpec((block,), lambda i: (i,)),
        interpret=blocks.num_warps is None,
        compiler_params=compiler_params(platform),
        name="colbert_maxsim",
    )(q, c, r, weights, lens)
    return out[:n]


def _maxsim_pallas(Q, centroid_rows, residuals, weights, lengths, *, nbits: int, clamp: bool):
    fn = functools.partial(_maxsim_call, nbits=nbits, clamp=clamp)
    return per_platform(fn, Q, centroid_rows, residuals, weights, lengths)


@functools.partial(jax.jit, static_argnames=("nbits", "clamp", "implementation"))
def maxsim(
    Q: jax.Array,
    centroid_rows: jax.Array,
    residuals: jax.Array,
    weights: jax.Array,
    lengths: jax.Array,
    *,
    nbits: int,
    clamp: bool = False,
    implementation: str = "auto",
) -> jax.Array:
    """MaxSim scores of residual-coded documents against one query.

    Args:
      Q: float32 [Lq, dim], the query vectors (every row counts).
      centroid_rows: float32 [n, L, dim], each document's embeddings' centroids (rows past its length are
        ignored).
      residuals: uint8 [n, L, dim * nbits / 8], packed bucket indices.
      weights: float32 [2^nbits], the bucket values.
      lengths: int [n], each document's number of embeddings (0: every query token scores -9999).
      nbits: 1, 2, 4 or 8.
      clamp: floor each query vector's maximum at 0 (colbert-ai's CPU scoring).
      implementation: "auto" (Pallas on GPU, else jnp), "pallas" or "jnp" (`pallas_kernels.dispatch`).

    Returns:
      float32 [n], equal to `maxsim_reference` (float32 arithmetic throughout).
    """
    args = (
        Q.astype(jnp.float32),
        centroid_rows.astype(jnp.float32),
        residuals.astype(jnp.uint8),
        weights.astype(jnp.float32),
        lengths.astype(jnp.int32),
    )
    statics = dict(nbits=nbits, clamp=clamp)
    if resolve("maxsim", implementation, _maxsim_pallas, args, statics) == "jnp":
        return maxsim_reference(*args, **statics)
    return _maxsim_pallas(*args, **statics)
