"""PLAID retrieval as two jitted stages of pure array functions, batched over queries and sharded over
devices.

Mirrors colbert-ai 0.2.22 `colbert/search/{candidate_generation,index_storage}.py` and `filter_pids.cpp`:

`candidates` (stages 1-2):
  S = C . Q[:query_maxlen]^T                      centroid scores [P, Lq]
  cells = top-`ncells` centroids of each query token; the candidates are the union of their IVF lists.
  The lists are expanded into `max_entries` slots (an upper bound computed from the IVF), sorted and
  deduplicated;
  the stage also counts distinct candidates and their embeddings, so that the host can pick the
  (power-of-two) static sizes of the next stage.
`select` (stages 4-5) and `score` (stage 6), with a host round trip between them to size stage 6:
  pruned approximate score: sum_q max over the document's codes c with max_q' S[c, q'] >= threshold of
  S[c, q] (-9999 when none) -> keep the top `ndocs`;
  full approximate score over all codes -> keep the top `ndocs // 4`;
  exact MaxSim with the decompressed embeddings (all query tokens) -> top k.
Ties in the approximate stages favour the larger passage position, like the reference's heap.

Sharding: the index's passages are split into contiguous shards, one per device (`shard` mesh axis).
Each shard ranks its own candidates; every selection (top ndocs, top ndocs/4, top k) is made globally
from the shards' local winners (all_gather), so results equal a single device's. One code path for
1..N devices.

Three implementations of stages 2-6:
- "streamed" (`search_streamed`, the CPU default): one call after `cells`, one query at a time, the
  candidates' and survivors' embeddings streamed in fixed chunks with dynamic trip counts. Its static
  shapes depend only on the batch bucket, k and the bucketed IVF entry count, so a server's stream of
  batches of all sizes compiles a handful of programs, and a padding query costs nothing.
- "jnp" (`candidates`, `select`, `score`): staged, with host-chosen bucketed sizes, embeddings packed
  (no per-document padding), vmapped over queries on accelerators.
- "pallas": staged, each document padded to the longest one, with the centroid-interaction and fused
  decompress+MaxSim kernels (GPUs); `kernels` is their `implementation` ("pallas", or "auto" to fall back
  to their jnp twins where a kernel does not compile, see `pallas_kernels.dispatch`).
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
from pallas_kernels import centroid_interaction, maxsim
from pallas_kernels.decompress import byte_table

__all__ = [
    "IndexArrays",
    "cells",
    "candidates",
    "select",
    "score",
    "search_streamed",
    "working_set_per_query",
    "SHARDED_KEYS",
]

NEG_INF = -jnp.inf
AXIS = "shard"

# Device arrays of an index: a plain dict (a pytree). Per-shard arrays have a leading shard axis and
# are split over the mesh; positions inside a shard are local (add `first` for the global position).
#   centroids f32 [P, dim], bucket_weights f32 [K]                                  (replicated)
#   codes i32 [D, E + 1] (last: sentinel P); residuals u8 [D, E + 1, dim*nbits/8];
#   inv_norms f32 [D, E + 1]: 1 / ||centroid + residual|| of each embedding (for exact scoring);
#   doclens i32 [D, N + 1] (0 past the shard's passages); offsets i32 [D, N + 1];
#   ivf i32 [D, I]; ivf_offsets i32 [D, P + 1]; ivf_lengths i32 [D, P + 1] (last: 0);
#   first i32 [D] (global position of the shard's first passage); count i32 [D] (its passages).
#   allowed bool [D, N + 1] (optional): a search filter, the passages that may be candidates.
IndexArrays = dict
SHARDED_KEYS = (
    "allowed",
    "codes",
    "residuals",
    "inv_norms",
    "doclens",
    "offsets",
    "ivf",
    "ivf_offsets",
    "ivf_lengths",
    "first",
    "count",
)


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


def _map_queries(fn, xs, query_chunk: int):
    """vmap over queries, or a sequential map over chunks of `query_chunk` queries. On CPU, one query at a
    time is several times faster (XLA:CPU lowers batched gathers poorly); elsewhere chunks bound memory."""
    batch = jax.tree.leaves(xs)[0].shape[0]
    if 0 < query_chunk < batch:
        return jax.lax.map(fn, xs, batch_size=query_chunk)
    return jax.vmap(fn)(xs)


# -- stage 1-2 ------------------------------------------------------------------------------------
CELL_BLOCK = 128


def top_cells(S: jax.Array, n: int) -> jax.Array:
    """The n best centroids of each query token: S [P, Lq] -> ids [Lq, n], the set `top_k(S.T, n)` gives.

    Two levels, because XLA:CPU's top_k over all P centroids costs 2-3x the matmul that produced S: the n
    best scores lie in the n blocks of CELL_BLOCK centroids with the best maxima, so only those are ranked.
    """
    num_centroids, lq = S.shape
    blocks_total = num_centroids // CELL_BLOCK
    if num_centroids % CELL_BLOCK or blocks_total < 2 * n:
        return jax.lax.top_k(S.T, n)[1]
    blocked = S.reshape(blocks_total, CELL_BLOCK, lq)
    blocks = jax.lax.top_k(blocked.max(axis=1).T, n)[1]  # [Lq, n]
    values = blocked[blocks, :, jnp.arange(lq)[:, None]].reshape(lq, n * CELL_BLOCK)
    best = jax.lax.top_k(values, n)[1]
    return jnp.take_along_axis(blocks, best // CELL_BLOCK, axis=1) * CELL_BLOCK + best % CELL_BLOCK


def _centroid_scores(Q, a, query_maxlen: int):
    return jnp.dot(a["centroids"], Q[:query_maxlen].T, precision=jax.lax.Precision.HIGHEST)  # [P, Lq]


def _cells_one(Q, a, *, ncells: int, query_maxlen: int):
    """Centroid scores S [P, Lq], the probed cells (unique, padded with P) and their IVF entries count."""
    num_centroids = a["centroids"].shape[0]
    S = _centroid_scores(Q, a, query_maxlen)
    cells = top_cells(S, ncells).reshape(-1)  # [Lq * ncells]
    cells = jnp.unique(cells, size=cells.shape[0], fill_value=num_centroids)
    return S, cells, a["ivf_lengths"][cells].sum()


def _candidates_one(cells, a, *, max_entries: int):
    """The union of the cells' IVF lists: unique passage positions (ascending, then sentinels) and counts."""
    _, src, valid = _expand(a["ivf_lengths"][cells], a["ivf_offsets"][cells], max_entries)
    return unique_candidates(a["ivf"][jnp.where(valid, src, 0)], valid, a, max_entries=max_entries)


def unique_candidates(entries, valid, a, *, max_entries: int):
    """IVF entries [max_entries] (local positions where `valid`) -> the unique ones (ascending, then the
    sentinel), their number and their embeddings' number."""
    sentinel = a["doclens"].shape[0] - 1
    if "allowed" in a:  # a filter: passages outside it never become candidates
        valid &= a["allowed"][jnp.where(valid, entries, sentinel)]
    entries = jnp.sort(jnp.where(valid, entries, sentinel))
    first = jnp.concatenate([jnp.ones(1, bool), entries[1:] != entries[:-1]]) & (entries < sentinel)
    (slots,) = jnp.nonzero(first, size=max_entries, fill_value=max_entries - 1)
    unique = jnp.where(jnp.arange(max_entries) < first.sum(), entries[slots], sentinel)
    return unique, first.sum(), jnp.where(first, a["doclens"][entries], 0).sum()


@functools.partial(jax.jit, static_argnames=("mesh", "ncells", "query_maxlen", "query_chunk", "with_scores"))
def cells(Q, arrays, *, mesh: Mesh, ncells: int, query_maxlen: int, query_chunk: int = 0, with_scores: bool = True):
    """Stage 1: Q [B, Lq, dim] -> (S [B, P, Lq] (None unless with_scores), cells [B, Lq * ncells], IVF
    entries to expand [D, B])."""
    fn = functools.partial(_cells_one, ncells=ncells, query_maxlen=query_maxlen)

    def shard(Q, arrays):
        if not with_scores:  # S of a whole batch is B * P * Lq floats: skip it when the next stage redoes it
            c, n = _map_queries(lambda q: fn(q, _local(arrays))[1:], Q, query_chunk)
            return None, c, jax.lax.all_gather(n, AXIS)
        S, c, n = _map_queries(lambda q: fn(q, _local(arrays)), Q, query_chunk)
        return S, c, jax.lax.all_gather(n, AXIS)

    # The counts the host reads are gathered (replicated): over several processes each can read them.
    out_specs = (P() if with_scores else None, P(), P())
    return jax.shard_map(shard, mesh=mesh, in_specs=(P(), _specs(arrays)), out_specs=out_specs, check_vma=False)(
        Q, arrays
    )


@functools.partial(jax.jit, static_argnames=("mesh", "max_entries", "query_chunk"))
def candidates(cells, arrays, *, mesh: Mesh, max_entries: int, query_chunk: int = 0):
    """Stage 2: cells [B, Lq * ncells] -> (local candidates [D, B, max_entries] (unique, ascending, then the
    shard's sentinel position), #candidates [D, B], #candidate embeddings [D, B])."""
    fn = functools.partial(_candidates_one, max_entries=max_entries)

    def shard(cells, arrays):
        entries, n_cand, n_emb = _map_queries(lambda c: fn(c, _local(arrays)), cells, query_chunk)
        return entries[None], jax.lax.all_gather(n_cand, AXIS), jax.lax.all_gather(n_emb, AXIS)

    out_specs = (P(AXIS), P(), P())  # the counts the host reads: replicated
    return jax.shard_map(shard, mesh=mesh, in_specs=(P(), _specs(arrays)), out_specs=out_specs, check_vma=False)(
        cells, arrays
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


def _tables(S, threshold):
    """Centroid-score lookup table with a sentinel row for padding codes, and the kept-centroid mask."""
    keep = S.max(axis=1) >= threshold
    table = jnp.concatenate([S, jnp.full((1, S.shape[1]), MASKED_SCORE, S.dtype)])
    return table, jnp.concatenate([keep, jnp.zeros(1, bool)])


def _approx_packed(cand, table, kept, a, max_embeddings):
    """(pruned, full) centroid-interaction scores of `cand`, their embeddings laid out packed."""
    num_centroids = a["centroids"].shape[0]
    seg, emb, valid = _expand(a["doclens"][cand], a["offsets"][cand], max_embeddings)
    codes = jnp.where(valid, a["codes"][jnp.where(valid, emb, 0)], num_centroids)
    values = table[codes]  # one gather serves both stages
    n = cand.shape[0]
    pruned = _segment_max(jnp.where(kept[codes][:, None], values, MASKED_SCORE), seg, n).sum(1)
    return pruned, _segment_max(values, seg, n).sum(1)


def _approx_padded(cand, table, kept, a, max_doclen, kernels):
    """(pruned, full) with the Pallas centroid-interaction kernel, each document padded to max_doclen."""
    num_centroids = a["centroids"].shape[0]
    rows = a["offsets"][cand][:, None] + jnp.arange(max_doclen)
    present = jnp.arange(max_doclen) < a["doclens"][cand][:, None]
    codes = jnp.where(present, a["codes"][jnp.where(present, rows, a["codes"].shape[0] - 1)], num_centroids)
    pruned_table = jnp.where(kept[:, None], table, MASKED_SCORE)
    return (
        centroid_interaction(pruned_table, codes, implementation=kernels),
        centroid_interaction(table, codes, implementation=kernels),
    )


def _best(cand, values, a, n: int):
    """Mask of the local candidates among the n best values over all shards (never the sentinels)."""
    real = cand < a["doclens"].shape[0] - 1
    gpos = jnp.where(real, cand + a["first"], -1)
    return jnp.isin(gpos, _global_top(jnp.where(real, values, NEG_INF), gpos, n)) & real


def _compact(cand, mask, n: int, a):
    """The first n candidates where mask holds, order kept, sentinel-padded."""
    (slots,) = jnp.nonzero(mask, size=n, fill_value=0)
    return jnp.where(jnp.arange(n) < mask.sum(), cand[slots], a["doclens"].shape[0] - 1)


def _survivors(cand, pruned, full, a, ndocs: int):
    """Stages 4-5 selections (global over shards): the local survivors [ndocs // 4], sentinel-padded."""
    stage4 = _best(cand, pruned, a, ndocs)
    stage5 = _best(cand, jnp.where(stage4, full, NEG_INF), a, ndocs // 4) & stage4
    return _compact(cand, stage5, ndocs // 4, a)


def _exact_packed(Q, S, survivors, a, max_embeddings, nbits):
    """Per-token MaxSim [n2, Lq] of the survivors, their embeddings packed (only real rows are touched).

    q . normalize(c + r) = (q . c + q . r) / ||c + r||: q . c is the centroid score S[code, q] already
    computed for candidate generation and ||c + r|| is precomputed per embedding (`inv_norms`), so only
    the residual r is expanded here, not the centroid rows.
    """
    seg, emb, valid = _expand(a["doclens"][survivors], a["offsets"][survivors], max_embeddings)
    rows = jnp.where(valid, emb, a["codes"].shape[0] - 1)
    r = byte_table(a["bucket_weights"], nbits)[a["residuals"][rows]].reshape(rows.shape[0], -1)  # [T, dim]
    centroid_part = S.at[a["codes"][rows]].get(mode="clip")  # [T, Lq]
    sim = (centroid_part + jnp.dot(r, Q.T, precision=jax.lax.Precision.HIGHEST)) * a["inv_norms"][rows][:, None]
    return _segment_max(jnp.where(valid[:, None], sim, MASKED_SCORE), seg, survivors.shape[0])


def _top_k(scores, survivors, a, k: int):
    """The global top k over shards of the survivors' exact scores."""
    sentinel = a["doclens"].shape[0] - 1
    scores = jnp.where(survivors < sentinel, scores, NEG_INF)
    kk = min(k, survivors.shape[0])
    local_scores, local_best = jax.lax.top_k(scores, kk)
    all_scores = jax.lax.all_gather(local_scores, AXIS).reshape(-1)
    all_pos = jax.lax.all_gather(survivors[local_best] + a["first"], AXIS).reshape(-1)
    best_scores, best = jax.lax.top_k(all_scores, kk)
    return jnp.where(best_scores > NEG_INF, all_pos[best], -1), best_scores


def _reduce(per_token, clamp: bool):
    per_token = jnp.maximum(per_token, MASKED_SCORE)  # a document with no rows: -9999 per token
    return (jnp.maximum(per_token, 0.0) if clamp else per_token).sum(axis=1)


def _select_one(
    S,
    entries,
    threshold,
    a,
    *,
    ndocs: int,
    max_candidates: int,
    max_embeddings: int,
    max_doclen: int,
    implementation: str,
    kernels: str,
):
    """Stages 4-5 (staged path): -> (local survivors [ndocs // 4], their total number of embeddings)."""
    cand = entries[:max_candidates][::-1]  # the unique candidates, descending positions
    table, kept = _tables(S, threshold)
    if implementation == "pallas":
        pruned, full = _approx_padded(cand, table, kept, a, max_doclen, kernels)
    else:
        pruned, full = _approx_packed(cand, table, kept, a, max_embeddings)
    survivors = _survivors(cand, pruned, full, a, ndocs)
    return survivors, a["doclens"][survivors].sum()


def _score_one(
    Q,
    S,
    survivors,
    a,
    *,
    max_embeddings: int,
    max_doclen: int,
    k: int,
    nbits: int,
    clamp: bool,
    implementation: str,
    kernels: str,
):
    """Stage 6 (staged path): exact MaxSim of the local survivors, then the global top k."""
    if implementation == "pallas":
        lens = a["doclens"][survivors]
        rows = a["offsets"][survivors][:, None] + jnp.arange(max_doclen)
        rows = jnp.where(jnp.arange(max_doclen) < lens[:, None], rows, a["codes"].shape[0] - 1)
        centroid_rows = a["centroids"].at[a["codes"][rows]].get(mode="clip")
        residuals = a["residuals"][rows]
        weights = a["bucket_weights"]
        scores = maxsim(Q, centroid_rows, residuals, weights, lens, nbits=nbits, clamp=clamp, implementation=kernels)
    else:
        scores = _reduce(_exact_packed(Q, S, survivors, a, max_embeddings, nbits), clamp)
    return _top_k(scores, survivors, a, k)


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
    arrays,
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
    """Stages 4-5 -> (local survivors [D, B, ndocs // 4], their embedding counts [D, B])."""
    fn = functools.partial(
        _select_one,
        ndocs=ndocs,
        max_candidates=max_candidates,
        max_embeddings=max_embeddings,
        max_doclen=max_doclen,
        implementation=implementation,
        kernels=kernels,
    )

    def shard(S, entries, threshold, arrays):
        local = _local(arrays)
        survivors, n_emb = _map_queries(lambda x: fn(*x, threshold, local), (S, entries[0]), query_chunk)
        return survivors[None], jax.lax.all_gather(n_emb, AXIS)

    return jax.shard_map(
        shard, mesh=mesh, in_specs=(P(), P(AXIS), P(), _specs(arrays)), out_specs=(P(AXIS), P()), check_vma=False
    )(S, entries, threshold, arrays)


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
    arrays,
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
    """Stage 6 -> (global passage positions [B, min(k, ndocs//4)] (-1: none), scores [B, ...] (-inf: none))."""
    fn = functools.partial(
        _score_one,
        max_embeddings=max_embeddings,
        max_doclen=max_doclen,
        k=k,
        nbits=nbits,
        clamp=clamp,
        implementation=implementation,
        kernels=kernels,
    )

    def shard(Q, S, survivors, arrays):
        local = _local(arrays)
        return _map_queries(lambda x: fn(*x, local), (Q, S, survivors[0]), query_chunk)

    return jax.shard_map(
        shard, mesh=mesh, in_specs=(P(), P(), P(AXIS), _specs(arrays)), out_specs=(P(), P()), check_vma=False
    )(Q, S, survivors, arrays)


def working_set_per_query(*, max_candidates: int, max_embeddings: int, dim: int, query_maxlen: int) -> int:
    """Rough peak bytes of `select` or `score` for one query (for choosing `query_chunk`)."""
    return 4 * (3 * max_embeddings * max(query_maxlen, dim) + 8 * max_candidates)


# -- the streaming path (CPU): one program per (batch bucket, k), no host round trips -----------------
def _stream(lengths, starts, chunk: int, init, body):
    """Runs `body(carry, seg, src, valid)` over the packed slots of variable-length segments, `chunk` slots
    at a time, for as many chunks as the actual total needs (a dynamic trip count: no padding to a bucket).
    Segments are visited in order, so `seg` is sorted within every chunk."""
    ends = jnp.cumsum(lengths)
    first = ends - lengths
    total = ends[-1]

    def step(i, carry):
        lo = i * chunk
        slot = lo + jnp.arange(chunk)
        # The segment of each slot: one binary search for the chunk's first slot, then a +1 at every later
        # segment start (empty segments stack) and a running sum: half the cost of a search per slot.
        inside = (first > lo) & (first < lo + chunk)
        starts_here = jnp.zeros(chunk, jnp.int32).at[jnp.where(inside, first - lo, chunk)].add(1, mode="drop")
        seg = jnp.searchsorted(ends, lo, side="right") + jnp.cumsum(starts_here)
        seg = jnp.minimum(seg, lengths.shape[0] - 1)
        return body(carry, seg, starts[seg] + slot - first[seg], slot < total)

    return jax.lax.fori_loop(0, (total + chunk - 1) // chunk, step, init)


def _approx_streamed(cand, table, a, chunk: int):
    """Centroid-interaction scores of `cand` from `table` [P + 1, Lq], their embeddings streamed `chunk` at
    a time."""
    num_centroids = a["centroids"].shape[0]

    def body(acc, seg, emb, valid):
        codes = jnp.where(valid, a["codes"][jnp.where(valid, emb, 0)].astype(jnp.int32), num_centroids)
        return acc.at[seg].max(table[codes], indices_are_sorted=True)

    init = jnp.full((cand.shape[0], table.shape[1]), NEG_INF)
    return _stream(a["doclens"][cand], a["offsets"][cand], chunk, init, body).sum(1)


def _exact_streamed(Q, S, survivors, a, chunk: int, nbits: int):
    """Per-token MaxSim like `_exact_packed`, the survivors' embeddings streamed `chunk` at a time."""
    table = byte_table(a["bucket_weights"], nbits)

    def body(acc, seg, emb, valid):
        rows = jnp.where(valid, emb, a["codes"].shape[0] - 1)
        r = table[a["residuals"][rows]].reshape(rows.shape[0], -1)
        sim = S.at[a["codes"][rows]].get(mode="clip") + jnp.dot(r, Q.T, precision=jax.lax.Precision.HIGHEST)
        sim = jnp.where(valid[:, None], sim * a["inv_norms"][rows][:, None], MASKED_SCORE)
        return acc.at[seg].max(sim, indices_are_sorted=True)

    init = jnp.full((survivors.shape[0], Q.shape[0]), NEG_INF)
    return _stream(a["doclens"][survivors], a["offsets"][survivors], chunk, init, body)


def survivors_streamed(S, entries, threshold, a, *, ndocs: int, chunk: int):
    """Stages 4-5 for one query (inside `shard_map`; codes only, no residuals): its unique candidates (stage 2's
    `unique_candidates`) -> the local survivors [ndocs // 4] (descending positions, then the shard's sentinel)."""
    cand = entries[::-1]  # the unique candidates, descending positions
    table, kept = _tables(S, threshold)
    # Stage 4 over all candidates with the pruned table; stage 5's full scores only for stage 4's ndocs
    # (as the reference does): the candidates' embeddings are streamed once, not twice.
    pruned = _approx_streamed(cand, jnp.where(kept[:, None], table, MASKED_SCORE), a, chunk)
    cand4 = _compact(cand, _best(cand, pruned, a, ndocs), ndocs, a)
    full = _approx_streamed(cand4, table, a, chunk)
    return _compact(cand4, _best(cand4, full, a, ndocs // 4), ndocs // 4, a)


def streamed_chunk(max_entries: int) -> int:
    """`search_streamed`'s default candidate embeddings per step: twice the IVF entries, within 4,096..16,384."""
    return min(max(2 * max_entries, 4096), 16384)


def _search_one_streamed(Q, S, cells, real, threshold, a, *, max_entries, ndocs, k, nbits, clamp, chunk, exact_chunk):
    """Stages 2-6 for one query; a padding query (`real` False) skips the work. S None: recomputed here."""
    kk = min(k, ndocs // 4)

    def run(Q, S):
        if S is None:
            S = _centroid_scores(Q, a, Q.shape[0])
        entries, _, _ = _candidates_one(cells, a, max_entries=max_entries)
        survivors = survivors_streamed(S, entries, threshold, a, ndocs=ndocs, chunk=chunk)
        return _top_k(_reduce(_exact_streamed(Q, S, survivors, a, exact_chunk, nbits), clamp), survivors, a, k)

    def skip(Q, S):
        return jnp.full((kk,), -1, jnp.int32), jnp.full((kk,), NEG_INF, jnp.float32)

    return jax.lax.cond(real, run, skip, Q, S)


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "max_entries", "ndocs", "k", "nbits", "clamp", "chunk", "exact_chunk"),
)
def search_streamed(
    Q,
    S,
    cells,
    real,
    threshold,
    arrays,
    *,
    mesh: Mesh,
    max_entries: int,
    ndocs: int,
    k: int,
    nbits: int,
    clamp: bool = False,
    chunk: int | None = None,
    exact_chunk: int = 512,
):
    """Stages 2-6 in one call after `cells`, one query at a time, the candidates' and survivors' embeddings
    streamed in chunks with dynamic trip counts: the static shapes depend only on the batch bucket, k and
    the bucketed number of IVF entries, so a stream of batches compiles a handful of programs (the CPU path).

    S [B, P, Lq] from `cells`, or None to recompute it per query (a batch's S can be large: 512 MB for 64
    queries at 65,536 centroids). real [B] bool (False: padding) -> (global positions [B, min(k, ndocs//4)]
    (-1: none), scores (-inf: none)). `chunk` (candidate embeddings per step) defaults to twice the IVF
    entries, within 4,096..16,384: bigger steps pay off when there are many candidates (measured 1.3x
    faster at 16.5 M embeddings), smaller ones waste less padding when there are few.
    """
    if chunk is None:
        chunk = streamed_chunk(max_entries)
    fn = functools.partial(
        _search_one_streamed,
        max_entries=max_entries,
        ndocs=ndocs,
        k=k,
        nbits=nbits,
        clamp=clamp,
        chunk=chunk,
        exact_chunk=exact_chunk,
    )

    def shard(Q, S, cells, real, threshold, arrays):
        local = _local(arrays)
        return _map_queries(lambda x: fn(*x, threshold, local), (Q, S, cells, real), 1)

    return jax.shard_map(
        shard, mesh=mesh, in_specs=(P(), P(), P(), P(), P(), _specs(arrays)), out_specs=(P(), P()), check_vma=False
    )(Q, S, cells, real, threshold, arrays)
