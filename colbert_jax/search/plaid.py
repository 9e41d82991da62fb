"""PLAID retrieval as two jitted stages of pure array functions, batched over queries and sharded over
devices.

Mirrors colbert-ai 0.2.22 `colbert/search/{candidate_generation,index_storage}.py` and `filter_pids.cpp`:

`candidates` (stages 1-2):
  S = C . Q[:query_maxlen]^T                      centroid scores [P, Lq]
  cells = top-`ncells` centroids of each query token; the candidates are the union of their IVF lists.
  The lists are expanded into `max_entries` slots (an upper bound computed from the IVF) and sorted;
  the stage also counts distinct candidates and their embeddings, so that the host can pick the
  (power-of-two) static sizes of the next stage.
`rank` (stages 4-6):
  pruned approximate score: sum_q max over the document's codes c with max_q' S[c, q'] >= threshold of
  S[c, q] (-9999 when none) -> keep the top `ndocs`;
  full approximate score over all codes -> keep the top `ndocs // 4`;
  exact MaxSim with the decompressed embeddings (all query tokens) -> top k.
Ties in the approximate stages favour the larger passage position, like the reference's heap.

Sharding: the index's passages are split into contiguous shards, one per device (`shard` mesh axis).
Each shard ranks its own candidates; every selection (top ndocs, top ndocs/4, top k) is made globally
from the shards' local winners (all_gather), so results equal a single device's. One code path for
1..N devices.

Two implementations of the approximate and exact scoring: "jnp" lays candidate embeddings out packed
and reduces with segment_max (little padding: the fast path on CPU); "pallas" pads each candidate to
the longest document and runs the centroid-interaction and fused decompress+MaxSim kernels (GPUs).
`clamp=True` reproduces colbert-ai's CPU scoring (its `segmented_maxsim` starts each query token's
maximum at 0, so negative maxima count as 0); the default is its GPU semantics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from colbert_jax.scoring import MASKED_SCORE
from pallas_kernels.centroid_interaction import centroid_interaction
from pallas_kernels.maxsim import maxsim, maxsim_reference

__all__ = ["IndexArrays", "candidates", "rank", "rank_memory_per_query", "SHARDED_KEYS"]

NEG_INF = -jnp.inf
AXIS = "shard"

# Device arrays of an index: a plain dict (a pytree). Per-shard arrays have a leading shard axis and
# are split over the mesh; positions inside a shard are local (add `first` for the global position).
#   centroids f32 [P, dim], bucket_weights f32 [K]                                  (replicated)
#   codes i32 [D, E + 1] (last: sentinel P); residuals u8 [D, E + 1, dim*nbits/8];
#   doclens i32 [D, N + 1] (0 past the shard's passages); offsets i32 [D, N + 1];
#   ivf i32 [D, I]; ivf_offsets i32 [D, P + 1]; ivf_lengths i32 [D, P + 1] (last: 0);
#   first i32 [D] (global position of the shard's first passage); count i32 [D] (its passages).
IndexArrays = dict
SHARDED_KEYS = ("codes", "residuals", "doclens", "offsets", "ivf", "ivf_offsets", "ivf_lengths", "first", "count")


def _specs(arrays):
    return {k: P(AXIS) if k in SHARDED_KEYS else P() for k in arrays}


def _local(arrays):
    """Inside shard_map: drop the (size 1) shard axis of per-shard arrays."""
    return {k: (v[0] if k in SHARDED_KEYS else v) for k, v in arrays.items()}


def _expand(lengths: jax.Array, starts: jax.Array, total: int):
    """Packed expansion of variable-length segments into `total` slots.

    Returns (segment id per slot, position in the source per slot, valid mask per slot).
    """
    seg = jnp.repeat(jnp.arange(lengths.shape[0]), lengths, total_repeat_length=total)
    first = jnp.cumsum(lengths) - lengths
    slot = jnp.arange(total)
    valid = slot < lengths.sum()
    return seg, starts[seg] + slot - first[seg], valid


# -- stage 1-2 ------------------------------------------------------------------------------------
def _candidates_one(Q, a, *, ncells: int, max_entries: int, query_maxlen: int):
    num_centroids = a["centroids"].shape[0]
    sentinel = a["doclens"].shape[0] - 1
    S = jnp.dot(a["centroids"], Q[:query_maxlen].T, precision=jax.lax.Precision.HIGHEST)  # [P, Lq]
    cells = jax.lax.top_k(S.T, ncells)[1].reshape(-1)  # [Lq * ncells]
    cells = jnp.unique(cells, size=cells.shape[0], fill_value=num_centroids)
    _, src, valid = _expand(a["ivf_lengths"][cells], a["ivf_offsets"][cells], max_entries)
    entries = jnp.sort(jnp.where(valid, a["ivf"][jnp.where(valid, src, 0)], sentinel))
    first = jnp.concatenate([jnp.ones(1, bool), entries[1:] != entries[:-1]]) & (entries < sentinel)
    return S, entries, first.sum(), jnp.where(first, a["doclens"][entries], 0).sum()


@functools.partial(jax.jit, static_argnames=("mesh", "ncells", "max_entries", "query_maxlen"))
def candidates(Q, arrays, *, mesh: Mesh, ncells: int, max_entries: int, query_maxlen: int):
    """Q [B, Lq, dim] -> (S [B, P, Lq], sorted local candidate entries [D, B, max_entries] (padded with the
    shard's sentinel position), #candidates [D, B], #candidate embeddings [D, B])."""
    fn = functools.partial(_candidates_one, ncells=ncells, max_entries=max_entries, query_maxlen=query_maxlen)

    def shard(Q, arrays):
        S, entries, n_cand, n_emb = jax.vmap(fn, in_axes=(0, None))(Q, _local(arrays))
        return S, entries[None], n_cand[None], n_emb[None]

    out_specs = (P(), P(AXIS), P(AXIS), P(AXIS))
    return jax.shard_map(shard, mesh=mesh, in_specs=(P(), _specs(arrays)), out_specs=out_specs, check_vma=False)(
        Q, arrays
    )


# -- stages 4-6 -----------------------------------------------------------------------------------
def _segment_max(values, seg, num_segments):
    return jax.ops.segment_max(values, seg, num_segments=num_segments, indices_are_sorted=True)


def _global_top(values: jax.Array, ids: jax.Array, n: int) -> jax.Array:
    """The ids of the n best values over all shards. Each shard's `ids` are descending global positions,
    shards are concatenated last-first, so ties go to the larger position, as on one device."""
    n_local = min(n, values.shape[0])
    best_v, best = jax.lax.top_k(values, n_local)
    all_v = jax.lax.all_gather(best_v, AXIS)[::-1].reshape(-1)
    all_ids = jax.lax.all_gather(ids[best], AXIS)[::-1].reshape(-1)
    chosen_v, chosen = jax.lax.top_k(all_v, min(n, all_v.shape[0]))
    return jnp.where(chosen_v > NEG_INF, all_ids[chosen], -1)


def _rank_one(
    Q,
    S,
    entries,
    threshold,
    a,
    *,
    ndocs: int,
    max_candidates: int,
    max_embeddings: int,
    max_doclen: int,
    k: int,
    nbits: int,
    clamp: bool,
    implementation: str,
):
    num_centroids = a["centroids"].shape[0]
    sentinel = a["doclens"].shape[0] - 1
    sentinel_row = a["codes"].shape[0] - 1
    cand = jnp.unique(entries, size=max_candidates, fill_value=sentinel)[::-1]  # descending positions
    real = cand < sentinel
    gpos = jnp.where(real, cand + a["first"], -1)

    keep = S.max(axis=1) >= threshold
    sentinel_scores = jnp.full((1, S.shape[1]), MASKED_SCORE, S.dtype)
    full_table = jnp.concatenate([S, sentinel_scores])
    pruned_table = jnp.concatenate([jnp.where(keep[:, None], S, MASKED_SCORE), sentinel_scores])
    if implementation == "pallas":
        rows = a["offsets"][cand][:, None] + jnp.arange(max_doclen)
        present = jnp.arange(max_doclen) < a["doclens"][cand][:, None]
        codes = jnp.where(present, a["codes"][jnp.where(present, rows, sentinel_row)], num_centroids)
        pruned = centroid_interaction(pruned_table, codes)
        full = centroid_interaction(full_table, codes)
    else:
        seg, emb, valid = _expand(a["doclens"][cand], a["offsets"][cand], max_embeddings)
        codes = jnp.where(valid, a["codes"][jnp.where(valid, emb, 0)], num_centroids)
        pruned = _segment_max(pruned_table[codes], seg, max_candidates).sum(1)
        full = _segment_max(full_table[codes], seg, max_candidates).sum(1)
    pruned = jnp.where(real, pruned, NEG_INF)

    stage4 = jnp.isin(gpos, _global_top(pruned, gpos, ndocs)) & real
    full = jnp.where(stage4, full, NEG_INF)
    stage5 = jnp.isin(gpos, _global_top(full, gpos, ndocs // 4)) & stage4

    n2 = min(ndocs // 4, max_candidates)
    (slots,) = jnp.nonzero(stage5, size=n2, fill_value=0)
    survivors = jnp.where(jnp.arange(n2) < stage5.sum(), cand[slots], sentinel)
    lens = a["doclens"][survivors]
    rows = a["offsets"][survivors][:, None] + jnp.arange(max_doclen)
    rows = jnp.where(jnp.arange(max_doclen) < lens[:, None], rows, sentinel_row)
    centroid_rows = a["centroids"].at[a["codes"][rows]].get(mode="clip")
    score_fn = maxsim if implementation == "pallas" else maxsim_reference
    scores = score_fn(Q, centroid_rows, a["residuals"][rows], a["bucket_weights"], lens, nbits=nbits, clamp=clamp)
    scores = jnp.where(survivors < sentinel, scores, NEG_INF)

    kk = min(k, n2)
    local_scores, local_best = jax.lax.top_k(scores, kk)
    all_scores = jax.lax.all_gather(local_scores, AXIS).reshape(-1)
    all_pos = jax.lax.all_gather(survivors[local_best] + a["first"], AXIS).reshape(-1)
    best_scores, best = jax.lax.top_k(all_scores, kk)
    return jnp.where(best_scores > NEG_INF, all_pos[best], -1), best_scores


@functools.partial(
    jax.jit,
    static_argnames=(
        "mesh",
        "ndocs",
        "max_candidates",
        "max_embeddings",
        "max_doclen",
        "k",
        "nbits",
        "clamp",
        "implementation",
        "query_chunk",
    ),
)
def rank(
    Q,
    S,
    entries,
    threshold,
    arrays,
    *,
    mesh: Mesh,
    ndocs: int,
    max_candidates: int,
    max_embeddings: int,
    max_doclen: int,
    k: int,
    nbits: int,
    clamp: bool = False,
    implementation: str = "jnp",
    query_chunk: int = 0,
):
    """-> (global passage positions [B, min(k, ndocs//4)] (-1: no result), scores (-inf: no result)).

    Queries are processed `query_chunk` at a time (0: all at once) to bound the working set, which
    grows with ndocs/4 x max_doclen x dim per query.
    """
    fn = functools.partial(
        _rank_one,
        ndocs=ndocs,
        max_candidates=max_candidates,
        max_embeddings=max_embeddings,
        max_doclen=max_doclen,
        k=k,
        nbits=nbits,
        clamp=clamp,
        implementation=implementation,
    )

    def shard(Q, S, entries, threshold, arrays):
        local = _local(arrays)
        one = lambda x: fn(*x, threshold, local)
        batch = Q.shape[0]
        if 0 < query_chunk < batch:
            return jax.lax.map(one, (Q, S, entries[0]), batch_size=query_chunk)
        return jax.vmap(one)((Q, S, entries[0]))

    return jax.shard_map(
        shard, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(), _specs(arrays)), out_specs=(P(), P()), check_vma=False
    )(Q, S, entries, threshold, arrays)


def rank_memory_per_query(
    *, ndocs: int, max_candidates: int, max_embeddings: int, max_doclen: int, dim: int, query_maxlen: int
) -> int:
    """Rough peak bytes of `rank` for one query (for choosing `query_chunk`)."""
    survivors = min(ndocs // 4, max_candidates)
    return 4 * (4 * survivors * max_doclen * dim + 3 * max_embeddings * query_maxlen + 8 * max_candidates)
