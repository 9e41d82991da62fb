"""PLAID centroid interaction: approximate document scores from centroid scores alone, as a Pallas kernel.

approx(doc) = sum over query vectors q of max over the document's codes c of S[c, q], where S [P + 1, Lq]
holds the centroid scores with a last "sentinel" row for padding codes (pass a pruned S, with -9999 rows
for pruned centroids, for PLAID's pruned stage). `centroid_interaction_reference` is the plain `jnp`
definition; `centroid_interaction` computes the same, in the kernel or with the reference
(`implementation`, see `pallas_kernels.dispatch`). The kernel reads S rows through dynamic ref slices
(`pl.ds`), which Triton allows where a value-level gather is not; S itself is never loaded whole, so its
row count needs no padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import BLOCK_SIZES, compiler_params, per_platform, pow2, resolve

__all__ = ["centroid_interaction", "centroid_interaction_reference"]


def centroid_interaction_reference(S: jax.Array, codes: jax.Array) -> jax.Array:
    """S float32 [P + 1, Lq] (last row: padding sentinel); codes int32 [n, L] in [0, P] -> float32 [n]."""
    return S[codes].max(axis=1).sum(axis=-1)


def _centroid_interaction_kernel(s_ref, codes_ref, o_ref, *, length: int, lq: int):
    docs = o_ref.shape[0]
    lqp = s_ref.shape[1]
    token = jax.lax.broadcasted_iota(jnp.int32, (1, lqp), 1) < lq
    slot = jax.lax.broadcasted_iota(jnp.int32, (docs,), 0)

    def doc(b, out):
        def body(j, acc):
            return jnp.maximum(acc, s_ref[pl.ds(codes_ref[b, j], 1), :])

        acc = jax.lax.fori_loop(0, length, body, jnp.full((1, lqp), -jnp.inf, jnp.float32))
        return jnp.where(slot == b, jnp.sum(jnp.where(token, acc, 0.0)), out)

    o_ref[...] = jax.lax.fori_loop(0, docs, doc, jnp.zeros((docs,), jnp.float32))


def _centroid_interaction_call(platform: str, S, codes):
    blocks = BLOCK_SIZES[platform]
    n, L = codes.shape
    rows, lq = S.shape
    lqp = pow2(lq)
    block = min(blocks.interaction_docs, pow2(n))
    padded = -(-n // block) * block
    S = jnp.pad(S, ((0, 0), (0, lqp - lq)))
    codes = jnp.pad(jnp.clip(codes, 0, rows - 1), ((0, padded - n), (0, 0)))  # out-of-range pl.ds would clamp
    out = pl.pallas_call(
        functools.partial(_centroid_interaction_kernel, length=L, lq=lq),
        out_shape=jax.ShapeDtypeStruct((padded,), jnp.float32),
        grid=(padded // block,),
        in_specs=[pl.BlockSpec((rows, lqp), lambda i: (0, 0)), pl.BlockSpec((block, L), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((block,), lambda i: (i,)),
        interpret=blocks.num_warps is None,
        compiler_params=compiler_params(platform),
        name="colbert_centroid_interaction",
    )(S, codes)
    return out[:n]


def _centroid_interaction_pallas(S, codes):
    return per_platform(_centroid_interaction_call, S, codes)


@functools.partial(jax.jit, static_argnames=("implementation",))
def centroid_interaction(S: jax.Array, codes: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """PLAID's approximate scores from centroid scores.

    Args:
      S: float32 [P + 1, Lq], centroid scores with a last sentinel row (MASKED) for padding codes.
      codes: int32 [n, L], each document's codes in [0, P], padded with P.
      implementation: "auto" (Pallas on GPU, else jnp), "pallas" or "jnp" (`pallas_kernels.dispatch`).

    Returns:
      float32 [n]: for each document, the sum over query vectors of the max over its codes; equal to
      `centroid_interaction_reference`.
    """
    args = (S.astype(jnp.float32), codes.astype(jnp.int32))
    if resolve("centroid_interaction", implementation, _centroid_interaction_pallas, args, {}) == "jnp":
        return centroid_interaction_reference(*args)
    return _centroid_interaction_pallas(*args)
