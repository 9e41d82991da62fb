"""Residual decompression: `normalize(C[code] + bucket_weights[bucket bits])`, as a Pallas kernel.

The packed layout is colbert-ai's (`colbert/indexing/codecs/residual.py`): dimension d's bucket index has
its nbits bits at stream positions d*nbits .. d*nbits+nbits-1, least significant first, and the stream
is packed 8 bits a byte, first bit in the most significant position.

`decompress_reference` is the plain `jnp` definition; `decompress` computes the same thing in a Pallas
kernel over blocks of rows. The centroid rows are gathered by the caller (XLA's gather is good, and a
value gather cannot be expressed in a Triton kernel). Inside the kernel the bytes are spread to the
`dim` columns by a matmul with a 0/1 selection matrix (exact: byte values <= 255 fit every float
format, each column has one term), then each column takes its bits with per-column shifts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["decompress", "decompress_reference", "decompress_block", "unpack_bits", "byte_table", "gpu_compiler_params"]


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


def decompress_block(c: jax.Array, r: jax.Array, w_ref, *, nbits: int) -> jax.Array:
    """Kernel-side decompression of a block: centroid rows [rows, dim], packed bytes [rows, nbytes] ->
    normalised [rows, dim]. Shared by the decompress and MaxSim kernels."""
    dim = c.shape[1]
    nbytes = r.shape[1]
    per_byte = 8 // nbits
    # Spread byte j to columns j*per_byte .. (j+1)*per_byte-1.
    col = jax.lax.broadcasted_iota(jnp.int32, (nbytes, dim), 1)
    row = jax.lax.broadcasted_iota(jnp.int32, (nbytes, dim), 0)
    select = (col // per_byte == row).astype(jnp.float32)
    spread = jnp.dot(r.astype(jnp.float32), select, preferred_element_type=jnp.float32)
    spread = spread.astype(jnp.int32)  # [rows, dim]: the byte holding each column's bits
    d = jax.lax.broadcasted_iota(jnp.int32, (1, dim), 1)
    bucket = jnp.zeros(spread.shape, jnp.int32)
    for k in range(nbits):
        shift = 7 - (d * nbits + k) % 8
        bucket = bucket | (((spread >> shift) & 1) << k)
    value = jnp.zeros(spread.shape, jnp.float32)
    for k in range(1 << nbits):  # a select chain: K <= 16 table entries, no gather
        value = jnp.where(bucket == k, w_ref[k], value)
    v = c.astype(jnp.float32) + value
    norm = jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True))
    return v / jnp.maximum(norm, 1e-12)


def _decompress_kernel(c_ref, r_ref, w_ref, o_ref, *, nbits: int):
    o_ref[...] = decompress_block(c_ref[...], r_ref[...], w_ref, nbits=nbits)


@functools.partial(jax.jit, static_argnames=("nbits", "block_rows", "interpret"))
def decompress(
    centroid_rows: jax.Array,
    residuals: jax.Array,
    weights: jax.Array,
    *,
    nbits: int,
    block_rows: int = 128,
    interpret: bool | None = None,
) -> jax.Array:
    """Pallas version of `decompress_reference`: same arguments, same result.

    `interpret=None` picks interpret mode on CPU (Pallas cannot compile for CPU) and compiles elsewhere.
    """
    n, dim = centroid_rows.shape
    nbytes = residuals.shape[1]
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    padded = -(-n // block_rows) * block_rows
    if padded != n:
        centroid_rows = jnp.pad(centroid_rows, ((0, padded - n), (0, 0)))
        residuals = jnp.pad(residuals, ((0, padded - n), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_decompress_kernel, nbits=nbits),
        out_shape=jax.ShapeDtypeStruct((padded, dim), jnp.float32),
        grid=(padded // block_rows,),
        in_specs=[
            pl.BlockSpec((block_rows, dim), lambda i: (i, 0)),
            pl.BlockSpec((block_rows, nbytes), lambda i: (i, 0)),
            pl.BlockSpec((1 << nbits,), lambda i: (0,)),
        ],
        out_specs=pl.BlockSpec((block_rows, dim), lambda i: (i, 0)),
        interpret=interpret,
        compiler_params=None if interpret else gpu_compiler_params(),
        name="colbert_decompress",
    )(centroid_rows.astype(jnp.float32), residuals, weights.astype(jnp.float32))
    return out[:n]


def gpu_compiler_params():
    """Triton parameters on GPU (Pallas' default lowering there is Mosaic GPU)."""
    try:
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=4, num_stages=2)
    except (ImportError, AttributeError):
        return None
