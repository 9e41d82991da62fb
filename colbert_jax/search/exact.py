"""Exact (brute-force) MaxSim over every passage of an index, for validation and small collections."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["exact_search"]


@functools.partial(jax.jit, static_argnames=("num_passages", "k"))
def exact_search(Q: jax.Array, embeddings: jax.Array, passage_of: jax.Array, *, num_passages: int, k: int):
    """Q [B, Lq, dim], embeddings [E, dim] (passage order), passage_of [E] -> (positions [B, k], scores [B, k]).

    score(q, p) = sum over query tokens of the max dot product with p's embeddings.
    """

    def one(q):
        sim = jnp.dot(embeddings, q.T, precision=jax.lax.Precision.HIGHEST)  # [E, Lq]
        per_token = jax.ops.segment_max(sim, passage_of, num_segments=num_passages, indices_are_sorted=True)
        scores = per_token.sum(axis=1)
        top_scores, top = jax.lax.top_k(scores, k)
        return top, top_scores

    return jax.lax.map(one, Q)
