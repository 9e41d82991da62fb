"""Residual decompression: `normalize(C[code] + bucket_weights[bucket bits])`, as a Pallas kernel.

The packed layout is colbert-ai's (0.2.22, `colbert/indexing/codecs/residual.py`): dimension d's bucket
index has its nbits bits at stream positions d*nbits .. d*nbits+nbits-1, least significant first, and the
stream is packed 8 bits a byte, first bit in the most significant position.

`decompress_reference` is the plain `jnp` definition; `decompress` computes the same thing, in a Pallas
kernel over blocks of rows or with the reference (`implementation`, see `pallas_kernels.dispatch`). The
centroid rows are gathered by the caller (XLA's gather is good, and a value gather cannot be expressed in
a Triton kernel). Inside the kernel each packed byte is loaded once and spread to its `8 // nbits`
columns by a matmul with a 0/1 selection matrix (exact at any matmul precision: byte values <= 255 and
one term per column), then each column takes its bits with per-column shifts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import BLOCK_SIZES, MIN_DOT, compiler_params, per_platform, pow2, resolve

__all__ = ["decompress", "decompress_reference", "decompress_tile", "unpack_bits", "byte_table"]


def unpack_bits(packed: jax.Array, nbits: int) -> jax.Array:
    """Packed uint8 [n, dim * nbits / 8] -> bucket indices uint8 [n, dim]."""
    n, nbytes = packed.shape
    bits = (packed[..., None] >> jnp.arange(7, -1, -1, dtype=jnp.uint8)) & 1  # [n, nbytes, 8], MSB first
    bits = bits.reshape(n, nbytes * 8 // nbits, nbits)
    return (bits << jnp.arange(nbits, dtype=jnp.uint8)).sum(-1, dtype=jnp.uint8)


def _normalize(v: jax.Array) -> jax.Array:
    return v / jnp.maximum(jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True)), 1e-12)


def byte_table(weights: jax.Array, nbits: int) -> jax.Array:
    """[256, 8 // nbits]: the residual values that one packed byte holds, first dimension first."""
    byte = jnp.arange(256, dtype=jnp.int32)[:, None].astype(jnp.uint8)
    return weights[unpack_bits(byte, nbits)]


def decompress_reference(
    centroid_rows: jax.Array, residuals: jax.Array, weights: jax.Array, *, nbits: int
) -> jax.Array:
    """centroid_rows float32 [n, dim], residuals uint8 [n, dim*nbits/8], weights float32 [2^nbits]
    -> float32 [n, dim], L2-normalised. (Each byte is looked up in a 256-entry table of its values.)"""
    n, dim = centroid_rows.shape
    values = byte_table(weights.astype(jnp.float32), nbits)[residuals].reshape(n, dim)
    return _normalize(centroid_rows.astype(jnp.float32) + values)


def decompress_tile(c: jax.Array, r: jax.Array, w_ref, *, nbits: int, dim: int) -> jax.Array:
    """Kernel-side decompression of a tile: centroid rows [rows, dp], packed bytes [rows, bp] (both
    zero-padded past the real `dim` columns and `dim * nbits / 8` bytes) -> normalised [rows, dp], zero
    past `dim`. Shared by the decompress and MaxSim kernels."""
    dp = c.shape[1]
    bp = r.shape[1]
    per_byte = 8 // nbits
    # Spread byte j to columns j*per_byte .. (j+1)*per_byte-1.
    col = jax.lax.broadcasted_iota(jnp.int32, (bp, dp), 1)
    row = jax.lax.broadcasted_iota(jnp.int32, (bp, dp), 0)
    select = (col // per_byte == row).astype(jnp.float32)
    spread = jnp.dot(r.astype(jnp.float32), select, preferred_element_type=jnp.float32).astype(jnp.int32)
    d = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)
    bucket = jnp.zeros(spread.shape, jnp.int32)
    for k in range(nbits):
        shift = 7 - (d * nbits + k) % 8
        bucket = bucket | (((spread >> shift) & 1) << k)
    value = jnp.zeros(spread.shape, jnp.float32)
    for k in range(1 << nbits):  # a select chain over the 2^nbits table entries: no gather
        value = jnp.where(bucket == k, w_ref[k], value)
    v = c.astype(jnp.float32) + jnp.where(d < dim, value, 0.0)  # padded columns stay 0 (the norm ignores them)
    norm = jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True))
    return v / jnp.maximum(norm, 1e-12)


def _decompress_kernel(c_ref, r_ref, w_ref, o_ref, *, nbits: int, dim: int):
    o_ref[...] = decompress_tile(c_ref[...], r_ref[...], w_ref, nbits=nbits, dim=dim)


def _decompress_call(platform: str, centroid_rows, residuals, weights, *, nbits: int):
    blocks = BLOCK_SIZES[platform]
    n, dim = centroid_rows.shape
    nbytes = residuals.shape[1]
    dp, bp = pow2(dim, MIN_DOT), pow2(nbytes, MIN_DOT)
    # Fewer rows per block past 128 columns: the block's values stay within the table's budget.
    rows = min(max(MIN_DOT, blocks.decompress_rows * 128 // max(dp, 128)), pow2(n, MIN_DOT))
    padded = -(-n // rows) * rows
    c = jnp.pad(centroid_rows, ((0, padded - n), (0, dp - dim)))
    r = jnp.pad(residuals, ((0, padded - n), (0, bp - nbytes)))
    out = pl.pallas_call(
        functools.partial(_decompress_kernel, nbits=nbits, dim=dim),
        out_shape=jax.ShapeDtypeStruct((padded, dp), jnp.float32),
        grid=(padded // rows,),
        in_specs=[
            pl.BlockSpec((rows, dp), lambda i: (i, 0)),
            pl.BlockSpec((rows, bp), lambda i: (i, 0)),
            pl.BlockSpec((1 << nbits,), lambda i: (0,)),
        ],
        out_specs=pl.BlockSpec((rows, dp), lambda i: (i, 0)),
        interpret=blocks.num_warps is None,
        compiler_params=compiler_params(platform),
        name="colbert_decompress",
    )(c, r, weights)
    return out[:n, :dim]


def _decompress_pallas(centroid_rows, residuals, weights, *, nbits: int):
    return per_platform(functools.partial(_decompress_call, nbits=nbits), centroid_rows, residuals, weights)


@functools.partial(jax.jit, static_argnames=("nbits", "implementation"))
def decompress(
    centroid_rows: jax.Array,
    residuals: jax.Array,
    weights: jax.Array,
    *,
    nbits: int,
    implementation: str = "auto",
) -> jax.Array:
    """Decompresses residual-coded embeddings.

    Args:
      centroid_rows: float32 [n, dim], each embedding's centroid.
      residuals: uint8 [n, dim * nbits / 8], packed bucket indices.
      weights: float32 [2^nbits], the bucket values.
      nbits: 1, 2, 4 or 8.
      implementation: "auto" (Pallas on GPU, else jnp), "pallas" or "jnp" (`pallas_kernels.dispatch`).

    Returns:
      float32 [n, dim], L2-normalised; equal to `decompress_reference` (float32 arithmetic throughout).
    """
    if residuals.ndim != 2 or residuals.shape[1] * 8 != centroid_rows.shape[1] * nbits:
        raise ValueError(f"residuals {residuals.shape} do not hold {centroid_rows.shape[1]} dims of {nbits} bits")
    args = (centroid_rows.astype(jnp.float32), residuals.astype(jnp.uint8), weights.astype(jnp.float32))
    if resolve("decompress", implementation, _decompress_pallas, args, dict(nbits=nbits)) == "jnp":
        return decompress_reference(*args, nbits=nbits)
    return _decompress_pallas(*args, nbits=nbits)
