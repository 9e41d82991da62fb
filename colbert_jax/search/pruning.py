"""PLAID stages 4-5: centroid interaction, candidates -> survivors, from the codes alone (no residuals).

  pruned approximate score: sum_q max over the document's codes c with max_q' S[c, q'] >= threshold of
  S[c, q] (-9999 when none) -> keep the top `ndocs`;
  full approximate score over all codes -> keep the top `ndocs // 4`.
Ties favour the larger passage position, like the reference's heap. Every selection is global over the
shards (each keeps its local winners, then all_gather), so results equal a single device's. Mirrors
colbert-ai 0.2.22 `colbert/search/index_storage.py` and `filter_pids.cpp`.

A candidate's codes are read three ways, one per implementation: packed into a bucketed number of slots
(`approx_packed`), each document padded for the Pallas kernel (`approx_padded`), or streamed in chunks with
a dynamic trip count (`approx_streamed`, the CPU path).
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
from colbert_jax.search.segments import expand, segment_max, stream
from pallas_kernels import centroid_interaction

__all__ = [
    "tables",
    "approx_packed",
    "approx_padded",
    "approx_streamed",
    "best",
    "compact",
    "select",
    "survivors_streamed",
]


def tables(S: jax.Array, threshold) -> tuple[jax.Array, jax.Array]:
    """Centroid-score lookup table with a sentinel row for padding codes, and the kept-centroid mask."""
    S = S.astype(jnp.float32)  # (float16 from int8 operands: sums in float32)
    keep = S.max(axis=1) >= threshold
    table = jnp.concatenate([S, jnp.full((1, S.shape[1]), MASKED_SCORE, S.dtype)])
    return table, jnp.concatenate([keep, jnp.zeros(1, bool)])


def row_codes(a: IndexArrays, rows: jax.Array, valid: jax.Array) -> jax.Array:
    """The codes of embedding `rows` (int32), P (the table's sentinel row) where not `valid`: a padding row is
    masked before its code is read (uint16 codes hold no P)."""
    return jnp.where(valid, a.codes[jnp.where(valid, rows, 0)].astype(jnp.int32), a.centroids.shape[0])


def approx_packed(cand, table, kept, a: IndexArrays, max_embeddings: int):
    """(pruned, full) centroid-interaction scores of `cand`, their embeddings laid out packed."""
    seg, emb, valid = expand(a.doclens[cand], a.offsets[cand], max_embeddings)
    codes = row_codes(a, emb, valid)
    values = table[codes]  # one gather serves both stages
    n = cand.shape[0]
    pruned = segment_max(jnp.where(kept[codes][:, None], values, MASKED_SCORE), seg, n).sum(1)
    return pruned, segment_max(values, seg, n).sum(1)


def approx_padded(cand, table, kept, a: IndexArrays, max_doclen: int, kernels: str):
    """(pruned, full) with the Pallas centroid-interaction kernel, each document padded to max_doclen."""
    rows = a.offsets[cand][:, None] + jnp.arange(max_doclen)
    present = jnp.arange(max_doclen) < a.doclens[cand][:, None]
    codes = jnp.where(present, a.codes[jnp.where(present, rows, a.padding_row)], a.centroids.shape[0])
    pruned_table = jnp.where(kept[:, None], table, MASKED_SCORE)
    return (
        centroid_interaction(pruned_table, codes, implementation=kernels),
        centroid_interaction(table, codes, implementation=kernels),
    )


def approx_streamed(cand, S, threshold, a: IndexArrays, chunk: int):
    """Centroid-interaction scores of `cand`, read from the centroid scores S [P, Lq] themselves: a code whose
    best score over the query tokens is below `threshold` (None: every code kept) or a padding slot scores
    MASKED_SCORE. No lookup table with a padding row: that would be a copy of S per query (8 MiB at 65,536
    centroids and 32 query tokens).

    On the CPU, with the native kernels built (`colbert_jax.native`), one loop over each candidate's rows;
    elsewhere the embeddings are streamed `chunk` at a time through a gather and a scatter-max."""
    if not native.enabled():
        return _approx_chunks(cand, S, threshold, a, chunk)
    lowest = jnp.float32(-jnp.inf) if threshold is None else threshold

    def on_cpu(cand, S, lowest):
        return native.centroid_interaction(S, a.codes, lowest, a.offsets[cand], a.doclens[cand])

    def elsewhere(cand, S, lowest):
        return _approx_chunks(cand, S, threshold, a, chunk)

    return jax.lax.platform_dependent(cand, S, lowest, cpu=on_cpu, default=elsewhere)


def _approx_chunks(cand, S, threshold, a: IndexArrays, chunk: int):
    """`approx_streamed` in jnp: the candidates' embeddings streamed `chunk` at a time."""
    S = S.astype(jnp.float32)  # (float16 from int8 operands: sums in float32)
    keep = None if threshold is None else S.max(axis=1) >= threshold

    def body(acc, seg, emb, valid):
        codes = a.codes[jnp.where(valid, emb, 0)].astype(jnp.int32)
        ok = valid if keep is None else valid & keep[codes]
        values = jnp.where(ok[:, None], S.at[codes].get(mode="clip"), MASKED_SCORE)
        return acc.at[seg].max(values, indices_are_sorted=True)

    init = jnp.full((cand.shape[0], S.shape[1]), NEG_INF)
    return stream(a.doclens[cand], a.offsets[cand], chunk, init, body).sum(1)


def _global_top(values: jax.Array, ids: jax.Array, n: int) -> jax.Array:
    """The ids of the n best values over all shards. Each shard's `ids` are descending global positions,
    shards are concatenated last-first, so ties go to the larger position, as on one device."""
    n_local = min(n, values.shape[0])
    best_v, best_ids = native.top_k(values, n_local)
    all_v = jax.lax.all_gather(best_v, AXIS)[::-1].reshape(-1)
    all_ids = jax.lax.all_gather(ids[best_ids], AXIS)[::-1].reshape(-1)
    chosen_v, chosen = native.top_k(all_v, min(n, all_v.shape[0]))
    return jnp.where(chosen_v > NEG_INF, all_ids[chosen], -1)


def best(cand: jax.Array, values: jax.Array, a: IndexArrays, n: int) -> jax.Array:
    """Mask of the local candidates among the n best values over all shards (never the sentinels)."""
    real = cand < a.sentinel
    gpos = jnp.where(real, cand + a.first, -1)
    return jnp.isin(gpos, _global_top(jnp.where(real, values, NEG_INF), gpos, n)) & real


def compact(cand: jax.Array, mask: jax.Array, n: int, a: IndexArrays) -> jax.Array:
    """The first n candidates where mask holds, order kept, sentinel-padded."""
    (slots,) = jnp.nonzero(mask, size=n, fill_value=0)
    return jnp.where(jnp.arange(n) < mask.sum(), cand[slots], a.sentinel)


@functools.partial(
    jax.jit,
    static_argnames=(
        "mesh",
        "ndocs",
        "max_candidates",
        "max_embeddings",
        "max_doclen",
        "implementation",
        "kernels",
        "query_chunk",
    ),
)
def select(
    S,
    entries,
    threshold,
    arrays: IndexArrays,
    *,
    mesh: Mesh,
    ndocs: int,
    max_candidates: int,
    max_embeddings: int,
    max_doclen: int,
    implementation: str = "jnp",
    kernels: str = "pallas",
    query_chunk: int = 0,
):
    """Stages 4-5 (staged): S [B, P, Lq], `candidates`' entries [D, B, max_entries] -> (local survivors
    [D, B, ndocs // 4], their embedding counts [D, B]). Sizes: `max_candidates` unique candidates and
    `max_embeddings` of their embeddings per query (packed), or `max_doclen` per document ("pallas")."""

    def one(S, entries, threshold, a):
        cand = entries[:max_candidates][::-1]  # the unique candidates, descending positions
        table, kept = tables(S, threshold)
        if implementation == "pallas":
            pruned, full = approx_padded(cand, table, kept, a, max_doclen, kernels)
        else:
            pruned, full = approx_packed(cand, table, kept, a, max_embeddings)
        stage4 = best(cand, pruned, a, ndocs)
        stage5 = best(cand, jnp.where(stage4, full, NEG_INF), a, ndocs // 4) & stage4
        survivors = compact(cand, stage5, ndocs // 4, a)
        return survivors, a.doclens[survivors].sum()

    def shard(S, entries, threshold, a):
        survivors, n_emb = map_queries(lambda x: one(*x, threshold, a), (S, entries[0]), query_chunk)
        return survivors[None], jax.lax.all_gather(n_emb, AXIS)

    return run_sharded(shard, mesh, (S, entries, threshold), arrays, (P(), P(AXIS), P()), (P(AXIS), P()))


def survivors_streamed(S, entries, threshold, a: IndexArrays, *, ndocs: int, chunk: int) -> jax.Array:
    """Stages 4-5 for one query (inside `shard_map`; codes only, no residuals): its unique candidates
    (`candidates.unique_candidates`) -> the local survivors [ndocs // 4] (descending positions, then the
    shard's sentinel)."""
    cand = entries[::-1]  # the unique candidates, descending positions
    # Stage 4 over all candidates with the kept centroids only; stage 5's full scores only for stage 4's ndocs
    # (as the reference does): the candidates' embeddings are streamed once, not twice.
    pruned = approx_streamed(cand, S, threshold, a, chunk)
    cand4 = compact(cand, best(cand, pruned, a, ndocs), ndocs, a)
    full = approx_streamed(cand4, S, None, a, chunk)
    return compact(cand4, best(cand4, full, a, ndocs // 4), ndocs // 4, a)
