"""Fused residual decompression + MaxSim over candidate documents, as a Pallas kernel.

For each candidate document (rows padded to L): decompress its embeddings, take the dot product with
every query vector, mask padded rows (-9999, colbert-ai's fill), max over the document's rows, sum over
query vectors. `maxsim_reference` is the plain `jnp` definition; `maxsim` computes the same in one
kernel per document, so decompressed vectors never go back to memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.decompress import decompress_block, decompress_reference, gpu_compiler_params

__all__ = ["maxsim", "maxsim_reference"]

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


def _maxsim_kernel(q_ref, c_ref, r_ref, w_ref, len_ref, o_ref, *, nbits: int, clamp: bool):
    D = decompress_block(c_ref[0], r_ref[0], w_ref, nbits=nbits)  # [L, dim]
    sim = jnp.dot(D, q_ref[...].T, preferred_element_type=jnp.float32)  # [L, Lq]
    rows = jax.lax.broadcasted_iota(jnp.int32, sim.shape, 0)
    per_token = jnp.max(jnp.where(rows < len_ref[0], sim, MASKED), axis=0)
    if clamp:
        per_token = jnp.maximum(per_token, 0.0)
    o_ref[0] = jnp.sum(per_token)


@functools.partial(jax.jit, static_argnames=("nbits", "clamp", "interpret"))
def maxsim(
    Q: jax.Array,
    centroid_rows: jax.Array,
    residuals: jax.Array,
    weights: jax.Array,
    lengths: jax.Array,
    *,
    nbits: int,
    clamp: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """Pallas version of `maxsim_reference`: same arguments, same result (one program per document)."""
    n, L, dim = centroid_rows.shape
    lq = Q.shape[0]
    nbytes = residuals.shape[2]
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return pl.pallas_call(
        functools.partial(_maxsim_kernel, nbits=nbits, clamp=clamp),
        out_shape=jax.ShapeDtypeStruct((n,), jnp.float32),
        grid=(n,),
        in_specs=[
            pl.BlockSpec((lq, dim), lambda i: (0, 0)),
            pl.BlockSpec((1, L, dim), lambda i: (i, 0, 0)),
            pl.BlockSpec((1, L, nbytes), lambda i: (i, 0, 0)),
            pl.BlockSpec((1 << nbits,), lambda i: (0,)),
            pl.BlockSpec((1,), lambda i: (i,)),
        ],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),
        interpret=interpret,
        compiler_params=None if interpret else gpu_compiler_params(),
        name="colbert_maxsim",
    )(
        Q.astype(jnp.float32),
        centroid_rows.astype(jnp.float32),
        residuals,
        weights.astype(jnp.float32),
        lengths.astype(jnp.int32),
    )
