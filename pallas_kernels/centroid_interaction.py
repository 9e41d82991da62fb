"""PLAID centroid interaction: approximate document scores from centroid scores alone, as a Pallas kernel.

approx(doc) = sum over query vectors q of max over the document's codes c of S[c, q], where S [P + 1, Lq]
holds the centroid scores with a last "sentinel" row for padding codes (pass a pruned S, with -9999 rows
for pruned centroids, for PLAID's pruned stage). `centroid_interaction_reference` is the plain `jnp`
definition; the kernel reads S rows through dynamic ref slices (`pl.ds`), which Triton allows where a
value-level gather is not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.decompress import gpu_compiler_params

__all__ = ["centroid_interaction", "centroid_interaction_reference"]


def centroid_interaction_reference(S: jax.Array, codes: jax.Array) -> jax.Array:
    """S float32 [P + 1, Lq] (last row: padding sentinel); codes int32 [n, L] in [0, P] -> float32 [n]."""
    return S[codes].max(axis=1).sum(axis=-1)


def _centroid_interaction_kernel(s_ref, codes_ref, o_ref, *, length: int):
    lq = s_ref.shape[1]

    def body(j, acc):
        code = codes_ref[0, j]
        return jnp.maximum(acc, s_ref[pl.ds(code, 1), :])

    acc = jax.lax.fori_loop(0, length, body, jnp.full((1, lq), -jnp.inf, jnp.float32))
    o_ref[0] = jnp.sum(acc)


@functools.partial(jax.jit, static_argnames=("interpret",))
def centroid_interaction(S: jax.Array, codes: jax.Array, *, interpret: bool | None = None) -> jax.Array:
    """Pallas version of `centroid_interaction_reference`: same arguments, same result."""
    n, L = codes.shape
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return pl.pallas_call(
        functools.partial(_centroid_interaction_kernel, length=L),
        out_shape=jax.ShapeDtypeStruct((n,), jnp.float32),
        grid=(n,),
        in_specs=[pl.BlockSpec(S.shape, lambda i: (0, 0)), pl.BlockSpec((1, L), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((1,), lambda i: (i,)),
        interpret=interpret,
        compiler_params=None if interpret else gpu_compiler_params(),
        name="colbert_centroid_interaction",
    )(S.astype(jnp.float32), codes.astype(jnp.int32))
