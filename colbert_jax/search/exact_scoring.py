"""PLAID stage 6: survivors -> exact MaxSim with the decompressed embeddings (all query tokens) -> top k.

  q . normalize(c + r) = (q . c + q . r) / ||c + r||
q . c is the centroid score S[code, q] already computed for candidate generation (or, for rows gathered from
disk without S, and where S came from bfloat16 or int8 operands (`a.approximate_scores`), the gathered
centroids' float32 product with Q: final scores keep float32's q . c) and ||c + r|| is precomputed per embedding
(`inv_norms`, or computed here for gathered rows), so only the residual r is expanded, not the centroid
rows. The survivors' rows are read packed (`exact_packed`), streamed in chunks (`exact_streamed`), or each
document padded for the fused Pallas decompress+MaxSim kernel (`exact_padded`).

`clamp=True` reproduces colbert-ai's CPU scoring (its `segmented_maxsim` starts each query token's maximum at
0, so negative maxima count as 0); the default is its GPU semantics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from colbert_jax import native
from colbert_jax.scoring import MASKED_SCORE
from colbert_jax.search.arrays import AXIS, NEG_INF, IndexArrays, map_queries, run_sharded
from colbert_jax.search.candidates import row_scores
from colbert_jax.search.segments import expand, segment_max, stream
from pallas_kernels import maxsim
from pallas_kernels.decompress import byte_table

__all__ = ["similarities", "exact_packed", "exact_streamed", "exact_padded", "reduce", "top_k", "score"]

HIGHEST = jax.lax.Precision.HIGHEST


def similarities(Q, S, emb, valid, a: IndexArrays, table) -> jax.Array:
    """q . normalize(c + r) [T, Lq] of the embedding rows `emb` (MASKED_SCORE where not `valid`). `table`:
    `byte_table` of the bucket weights. S None (or approximate: bf16 or int8 operands): q . c from the rows'
    centroids, and ||c + r|| computed as `codec._norms` computes the index's own when the arrays carry no
    `inv_norms` (rows gathered from disk)."""
    S = None if a.approximate_scores else S
    rows = jnp.where(valid, emb, a.padding_row)
    r = table[a.residuals[rows]].reshape(rows.shape[0], -1)  # [T, dim]
    c = a.centroids.at[a.codes[rows]].get(mode="clip") if S is None or a.inv_norms is None else None
    centroid_part = row_scores(c, Q, a) if S is None else S.at[a.codes[rows]].get(mode="clip")
    sim = centroid_part + jnp.dot(r, Q.T, precision=HIGHEST)
    inv = a.inv_norms[rows] if a.inv_norms is not None else 1.0 / jnp.maximum(jnp.linalg.norm(c + r, axis=-1), 1e-12)
    return jnp.where(valid[:, None], sim * inv[:, None], MASKED_SCORE)


def exact_packed(Q, S, survivors, a: IndexArrays, max_embeddings: int, nbits: int) -> jax.Array:
    """Per-token MaxSim [n, Lq] of the survivors, their embeddings packed into `max_embeddings` slots."""
    seg, emb, valid = expand(a.doclens[survivors], a.offsets[survivors], max_embeddings)
    sim = similarities(Q, S, emb, valid, a, byte_table(a.bucket_weights, nbits))
    return segment_max(sim, seg, survivors.shape[0])


def exact_streamed(Q, S, survivors, a: IndexArrays, chunk: int, nbits: int) -> jax.Array:
    """Per-token MaxSim [n, Lq] of the survivors. On the CPU, with the native kernels built and the rows'
    centroid scores S and norms at hand, one loop over their rows (`colbert_jax.native`; where S came from
    bfloat16 operands, it recomputes q . c in float32 for the rows' centroids); else their embeddings streamed
    `chunk` at a time."""
    table = byte_table(a.bucket_weights, nbits)
    if S is None or a.inv_norms is None or not native.enabled():
        return _exact_chunks(Q, S, survivors, a, chunk, table)
    exact_qc = a.centroids if a.approximate_scores else None

    def on_cpu(Q, S, survivors):
        lens, starts = a.doclens[survivors], a.offsets[survivors]
        return native.exact_maxsim(Q, S, a.codes, a.residuals, a.inv_norms, table, starts, lens, centroids=exact_qc)

    def elsewhere(Q, S, survivors):
        return _exact_chunks(Q, S, survivors, a, chunk, table)

    return jax.lax.platform_dependent(Q, S, survivors, cpu=on_cpu, default=elsewhere)


def _exact_chunks(Q, S, survivors, a: IndexArrays, chunk: int, table) -> jax.Array:
    """`exact_streamed` in jnp: the survivors' embeddings streamed `chunk` at a time."""

    def body(acc, seg, emb, valid):
        return acc.at[seg].max(similarities(Q, S, emb, valid, a, table), indices_are_sorted=True)

    init = jnp.full((survivors.shape[0], Q.shape[0]), NEG_INF)
    return stream(a.doclens[survivors], a.offsets[survivors], chunk, init, body)


def exact_padded(Q, survivors, a: IndexArrays, max_doclen: int, nbits: int, clamp: bool, kernels: str) -> jax.Array:
    """Document scores [n] with the fused decompress+MaxSim kernel, each document padded to max_doclen."""
    lens = a.doclens[survivors]
    rows = a.offsets[survivors][:, None] + jnp.arange(max_doclen)
    rows = jnp.where(jnp.arange(max_doclen) < lens[:, None], rows, a.padding_row)
    centroid_rows = a.centroids.at[a.codes[rows]].get(mode="clip")
    residuals = a.residuals[rows]
    return maxsim(Q, centroid_rows, residuals, a.bucket_weights, lens, nbits=nbits, clamp=clamp, implementation=kernels)


def reduce(per_token: jax.Array, clamp: bool) -> jax.Array:
    """Per-token maxima [n, Lq] -> document scores [n]."""
    per_token = jnp.maximum(per_token, MASKED_SCORE)  # a document with no rows: -9999 per token
    return (jnp.maximum(per_token, 0.0) if clamp else per_token).sum(axis=1)


def top_k(scores: jax.Array, survivors: jax.Array, a: IndexArrays, k: int) -> tuple[jax.Array, jax.Array]:
    """The global top k over shards of the survivors' exact scores -> (global positions (-1: none), scores)."""
    scores = jnp.where(survivors < a.sentinel, scores, NEG_INF)
    kk = min(k, survivors.shape[0])
    local_scores, local_best = native.top_k(scores, kk)
    all_scores = jax.lax.all_gather(local_scores, AXIS).reshape(-1)
    all_pos = jax.lax.all_gather(survivors[local_best] + a.first, AXIS).reshape(-1)
    best_scores, best = native.top_k(all_scores, kk)
    return jnp.where(best_scores > NEG_INF, all_pos[best], -1), best_scores


@functools.partial(
    jax.jit,
    static_argnames=(
        "mesh",
        "max_embeddings",
        "max_doclen",
        "k",
        "nbits",
        "clamp",
        "implementation",
        "kernels",
        "query_chunk",
    ),
)
def score(
    Q,
    S,
    survivors,
    arrays: IndexArrays,
    *,
    mesh: Mesh,
    max_embeddings: int,
    max_doclen: int,
    k: int,
    nbits: int,
    clamp: bool = False,
    implementation: str = "jnp",
    kernels: str = "pallas",
    query_chunk: int = 0,
):
    """Stage 6 (staged): Q [B, Lq, dim], S [B, P, Lq], local survivors [D, B, n] -> (global passage positions
    [B, min(k, n)] (-1: none), scores [B, ...] (-inf: none))."""

    def one(Q, S, survivors, a):
        if implementation == "pallas":
            scores = exact_padded(Q, survivors, a, max_doclen, nbits, clamp, kernels)
        else:
            scores = reduce(exact_packed(Q, S, survivors, a, max_embeddings, nbits), clamp)
        return top_k(scores, survivors, a, k)

    def shard(Q, S, survivors, a):
        return map_queries(lambda x: one(*x, a), (Q, S, survivors[0]), query_chunk)

    return run_sharded(shard, mesh, (Q, S, survivors), arrays, (P(), P(), P(AXIS)), (P(), P()))
