"""PLAID stages 1-2: query embeddings -> centroid scores -> probed cells -> candidate passages.

  S = C . Q[:query_maxlen]^T                      centroid scores [P, Lq] (on the tile unit of CPUs with
                                                  AMX-BF16: three bfloat16 products, `native.centroid_scores`;
                                                  on other AVX-512 CPUs `native.centroid_scores_f32`)
  cells = top-`ncells` centroids of each query token; the candidates are the union of their IVF lists,
  expanded into `max_entries` slots (an upper bound from the IVF), sorted and deduplicated.
The stages also count IVF entries, distinct candidates and their embeddings, so that the host can pick the
(power-of-two) static sizes of the next stage. Mirrors colbert-ai 0.2.22
`colbert/search/candidate_generation.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from colbert_jax import native
from colbert_jax.search.arrays import AXIS, IndexArrays, map_queries, run_sharded
from colbert_jax.search.segments import expand

__all__ = [
    "CELL_BLOCK",
    "top_cells",
    "centroid_scores",
    "centroid_scores_and_maxima",
    "row_scores",
    "cells",
    "cells_one",
    "cells_into",
    "candidates",
    "candidates_one",
    "unique_candidates",
]

CELL_BLOCK = native.SCORES_MAX_BLOCK  # 128: the blocks `top_cells` ranks first, whose maxima stage 1 may give
HIGHEST = jax.lax.Precision.HIGHEST
# Where S comes from bfloat16 or int8 operands, each token's ncells cells are the best by float32 q . c among its
# ncells + CELL_REFINE best by S: a near tie at the cut then falls as float32's S would have it, and a query's
# cells do not jump between near-tied centroids with the last bits of its embedding (int8's rounding steps
# otherwise turn an encoder's 1e-5 into a different cell).
CELL_REFINE = 3


def top_cells(S: jax.Array, n: int, maxima: jax.Array | None = None) -> jax.Array:
    """The n best centroids of each query token: S [P, Lq] -> ids [Lq, n], the set `top_k(S.T, n)` gives.

    Two levels, because XLA:CPU's top_k over all P centroids costs 2-3x the matmul that produced S: the n
    best scores lie in the n blocks of CELL_BLOCK centroids with the best maxima, so only those are ranked.
    maxima: those blocks' maxima [ceil(P / CELL_BLOCK), Lq] where the product that made S gave them (else
    taken here, a pass over all of S).
    """
    num_centroids, lq = S.shape
    blocks_total = num_centroids // CELL_BLOCK
    # top_k on float32 values (float16 S from int8 operands: XLA:CPU's top_k of other types is a full sort)
    if num_centroids % CELL_BLOCK or blocks_total < 2 * n:
        return jax.lax.top_k(S.T.astype(jnp.float32), n)[1]
    blocked = S.reshape(blocks_total, CELL_BLOCK, lq)
    maxima = blocked.max(axis=1).astype(jnp.float32) if maxima is None else maxima
    blocks = jax.lax.top_k(maxima.T, n)[1]  # [Lq, n]
    values = blocked[blocks, :, jnp.arange(lq)[:, None]].reshape(lq, n * CELL_BLOCK).astype(jnp.float32)
    best = jax.lax.top_k(values, n)[1]
    return jnp.take_along_axis(blocks, best // CELL_BLOCK, axis=1) * CELL_BLOCK + best % CELL_BLOCK


def centroid_scores(Q: jax.Array, a: IndexArrays, query_maxlen: int) -> jax.Array:
    """S = C . Q[:query_maxlen]^T [P, Lq]: a float32 product; where the arrays carry the centroids' bfloat16
    terms (`a.centroids_split`: CPUs with AMX-BF16), three bfloat16 products on the tile unit
    (`native.centroid_scores`); where they carry them in groups of 8 (`a.centroids_blocked`), the native float32
    product (`native.centroid_scores_f32`: sequential reads of the centroids, which bound it at large P); where
    they carry them rounded to bfloat16 (`a.centroids_bf16`), a product of bfloat16 operands with float32 sums
    (`native.centroid_scores_bf16`: half the bytes read, bfloat16's error); where they carry them quantized to
    int8 (`a.centroids_int8`), a product of int8 operands (`native.centroid_scores_int8`: a quarter of the bytes,
    twice bfloat16's products per instruction, int8's error), S then held as float16 (`a.scores_dtype`)."""
    return centroid_scores_and_maxima(Q, a, query_maxlen)[0]


def centroid_scores_and_maxima(Q: jax.Array, a: IndexArrays, query_maxlen: int) -> tuple[jax.Array, jax.Array | None]:
    """`centroid_scores` and, where its product gives them (the native float32 one), each token's maxima over
    blocks of CELL_BLOCK centroids [ceil(P / CELL_BLOCK), Lq] for `top_cells` (else None)."""
    Q = Q[:query_maxlen]
    if a.centroids_split is not None:
        return _split_product(a.centroids_split, Q, a.centroids.shape[0], lambda: a.centroids), None
    if a.centroids_blocked is not None:
        return _blocked_product(a.centroids_blocked, Q, a.centroids.shape[0], lambda: a.centroids, maxima=True)
    if a.centroids_bf16 is not None:
        return _bf16_product(a.centroids_bf16, Q, a.centroids.shape[0], lambda: a.centroids, maxima=True)
    if a.centroids_int8 is not None:
        return _int8_product(a.centroids_int8, a.centroids_int8_terms, Q, a.centroids.shape[0], lambda: a.centroids)
    return jnp.dot(a.centroids, Q.T, precision=HIGHEST), None


def row_scores(c: jax.Array, Q: jax.Array, a: IndexArrays) -> jax.Array:
    """q . c [n, Lq] of centroid rows c [n, dim] gathered from `a.centroids` for stage 6 (over rows read from
    disk, which has no S; or where S came from bfloat16 operands): by the product `centroid_scores` uses (each
    row's scores equal its row of S), except that for S on bfloat16 operands it is float32's."""
    if a.centroids_blocked is not None:
        return _blocked_product(native.block_centroids(c), Q, c.shape[0], lambda: c)
    if a.centroids_split is None:
        return jnp.dot(c, Q.T, precision=HIGHEST)
    n, dim = c.shape
    hi = c.astype(jnp.bfloat16)
    lo = (c - hi.astype(jnp.float32)).astype(jnp.bfloat16)
    pad = ((0, 0), (0, -n % 16), (0, -dim % 32))
    return _split_product(jnp.pad(jnp.stack([hi, lo]), pad), Q, n, lambda: c)


def _split_product(split: jax.Array, Q: jax.Array, n: int, rows) -> jax.Array:
    """[n, Lq] from bfloat16 terms [2, Pp, Kp] of n rows: on the tile unit where the kernels are built, else
    the same three products in XLA (the same numbers up to float32 rounding). Programs lowered for other
    platforms take the float32 product of `rows()`."""

    def cpu(Q):
        if native.enabled():  # the placed split implies AMX-BF16; arrays built by hand may run the portable loops
            implementation = "amx" if native.amx_bf16_available() else "portable"
            return native.centroid_scores(split, Q, n, implementation=implementation)
        hi, lo = (x[:n, : Q.shape[1]].astype(jnp.float32) for x in split)
        q_hi = Q.astype(jnp.bfloat16).astype(jnp.float32)
        q_lo = (Q - q_hi).astype(jnp.bfloat16).astype(jnp.float32)
        main = jnp.dot(hi, q_hi.T, precision=HIGHEST)
        return main + (jnp.dot(hi, q_lo.T, precision=HIGHEST) + jnp.dot(lo, q_hi.T, precision=HIGHEST))

    return jax.lax.platform_dependent(Q, cpu=cpu, default=lambda Q: jnp.dot(rows(), Q.T, precision=HIGHEST))


def _blocked_product(blocked: jax.Array, Q: jax.Array, n: int, rows, *, maxima: bool = False):
    """[n, Lq] from n rows in groups of 8 (`native.block_centroids`): the native float32 product where the kernels
    are built, else XLA's product of `rows()` (other platforms, or the kernels off). maxima: (S, its maxima over
    blocks of CELL_BLOCK rows), the kernel's or XLA's."""

    def xla(Q):
        S = jnp.dot(rows(), Q.T, precision=HIGHEST)
        if not maxima:
            return S
        padded = jnp.pad(S, ((0, -n % CELL_BLOCK), (0, 0)), constant_values=-jnp.inf)
        return S, padded.reshape(-1, CELL_BLOCK, S.shape[1]).max(axis=1)

    def cpu(Q):
        if native.enabled():
            return native.centroid_scores_f32(blocked, Q, n, block_maxima=maxima)
        return xla(Q)

    return jax.lax.platform_dependent(Q, cpu=cpu, default=xla)


def _bf16_product(packed: jax.Array, Q: jax.Array, n: int, rows, *, maxima: bool = False):
    """[n, Lq] = bf16(rows) . bf16(Q)^T with float32 sums, from n rows packed by `native.block_centroids_bf16`:
    the AVX-512 BF16 kernel where it runs, else XLA's float32 product of the same rounded operands (the same
    numbers up to the order of the float32 sums; every platform, so a placement gives one S up to rounding).
    maxima: (S, its maxima over blocks of CELL_BLOCK rows), the kernel's or XLA's."""

    def xla(Q):
        def rounded(x):
            return x.astype(jnp.bfloat16).astype(jnp.float32)

        S = jnp.dot(rounded(rows()), rounded(Q).T, precision=HIGHEST)
        if not maxima:
            return S
        padded = jnp.pad(S, ((0, -n % CELL_BLOCK), (0, 0)), constant_values=-jnp.inf)
        return S, padded.reshape(-1, CELL_BLOCK, S.shape[1]).max(axis=1)

    def cpu(Q):
        if native.avx512_bf16_available():
            return native.centroid_scores_bf16(packed, Q, n, block_maxima=maxima)
        return xla(Q)

    return jax.lax.platform_dependent(Q, cpu=cpu, default=xla)


def _int8_product(packed: jax.Array, terms: jax.Array, Q: jax.Array, n: int, rows):
    """(S float16, its float32 maxima over blocks of CELL_BLOCK rows) [n, Lq] from n rows quantized and packed by
    `native.block_centroids_int8` and Q quantized per token (`native.quantize_rows_int8`): the AVX-512 VNNI kernel
    where it runs, else XLA's product of the same integer codes with the same two scalings, rounded to float16
    (the same bits: the integer sums are exact in float32). float16 holds int8's scores far inside their error
    in half the bytes S takes in float32 (8 MiB a query at 65,536 centroids, written and read again)."""

    def xla(Q):
        codes, scales = native.quantize_rows_int8(rows())
        q_codes, q_scales = native.quantize_rows_int8(Q)
        dots = jnp.dot(codes, q_codes.T, precision=HIGHEST)
        # the kernel's order, (dots * scale_c) * scale_q: the barrier keeps XLA from folding the two scales first
        S = (jax.lax.optimization_barrier(dots * scales[:, None]) * q_scales[None, :]).astype(jnp.float16)
        padded = jnp.pad(S.astype(jnp.float32), ((0, -n % CELL_BLOCK), (0, 0)), constant_values=-jnp.inf)
        return S, padded.reshape(-1, CELL_BLOCK, S.shape[1]).max(axis=1)

    def cpu(Q):
        if native.stage1_int8_available():
            return native.centroid_scores_int8(packed, terms, Q, n, block_maxima=True)
        return xla(Q)

    return jax.lax.platform_dependent(Q, cpu=cpu, default=xla)


def cells_one(Q, a: IndexArrays, *, ncells: int, query_maxlen: int):
    """Centroid scores S [P, Lq], the probed cells (unique, padded with P) and their IVF entries count."""
    num_centroids = a.centroids.shape[0]
    S, maxima = centroid_scores_and_maxima(Q, a, query_maxlen)
    if a.approximate_scores:  # float32 q . c chooses among the approximate S's best few
        ids = top_cells(S, min(ncells + CELL_REFINE, num_centroids), maxima)  # [Lq, ncells + CELL_REFINE]
        exact = jnp.einsum("tkd,td->tk", a.centroids[ids], Q[:query_maxlen], precision=HIGHEST)
        cells = jnp.take_along_axis(ids, jax.lax.top_k(exact, ncells)[1], axis=1).reshape(-1)
    else:
        cells = top_cells(S, ncells, maxima).reshape(-1)  # [Lq * ncells]
    cells = jnp.unique(cells, size=cells.shape[0], fill_value=num_centroids)
    return S, cells, a.ivf_lengths[cells].sum()


def candidates_one(cells: jax.Array, a: IndexArrays, *, max_entries: int):
    """The union of the cells' IVF lists: unique passage positions (ascending, then sentinels) and counts."""
    _, src, valid = expand(a.ivf_lengths[cells], a.ivf_offsets[cells], max_entries)
    return unique_candidates(a.ivf[jnp.where(valid, src, 0)], valid, a, max_entries=max_entries)


def unique_candidates(entries: jax.Array, valid: jax.Array, a: IndexArrays, *, max_entries: int):
    """IVF entries [max_entries] (local positions where `valid`) -> the unique ones (ascending, then the
    sentinel), their number and their embeddings' number."""
    sentinel = a.sentinel
    if a.allowed is not None:  # a filter: passages outside it never become candidates
        valid &= a.allowed[jnp.where(valid, entries, sentinel)]
    entries = jnp.sort(jnp.where(valid, entries, sentinel))
    first = jnp.concatenate([jnp.ones(1, bool), entries[1:] != entries[:-1]]) & (entries < sentinel)
    (slots,) = jnp.nonzero(first, size=max_entries, fill_value=max_entries - 1)
    unique = jnp.where(jnp.arange(max_entries) < first.sum(), entries[slots], sentinel)
    return unique, first.sum(), jnp.where(first, a.doclens[entries], 0).sum()


def _cells_batch(Q, a: IndexArrays, *, ncells: int, query_maxlen: int, query_chunk: int, with_scores: bool):
    """Stage 1 of a batch in one shard: (S or None, cells, IVF entries gathered over the shards)."""
    fn = functools.partial(cells_one, ncells=ncells, query_maxlen=query_maxlen)
    if not with_scores:  # S of a whole batch is B * P * Lq floats: skip it when the next stage redoes it
        c, n = map_queries(lambda q: fn(q, a)[1:], Q, query_chunk)
        return None, c, jax.lax.all_gather(n, AXIS)
    S, c, n = map_queries(lambda q: fn(q, a), Q, query_chunk)
    return S, c, jax.lax.all_gather(n, AXIS)


@functools.partial(jax.jit, static_argnames=("mesh", "ncells", "query_maxlen", "query_chunk", "with_scores"))
def cells(
    Q: jax.Array,
    arrays: IndexArrays,
    *,
    mesh: Mesh,
    ncells: int,
    query_maxlen: int,
    query_chunk: int = 0,
    with_scores: bool = True,
):
    """Stage 1: Q [B, Lq, dim] -> (S [B, P, Lq] (None unless with_scores), cells [B, Lq * ncells], IVF
    entries to expand [D, B])."""
    statics = dict(ncells=ncells, query_maxlen=query_maxlen, query_chunk=query_chunk, with_scores=with_scores)
    # The counts the host reads are gathered (replicated): over several processes each can read them.
    out_specs = (P() if with_scores else None, P(), P())
    return run_sharded(lambda Q, a: _cells_batch(Q, a, **statics), mesh, (Q,), arrays, (P(),), out_specs)


@functools.partial(jax.jit, static_argnames=("mesh", "ncells", "query_maxlen"), donate_argnums=(1,))
def cells_into(Q: jax.Array, S: jax.Array, arrays: IndexArrays, *, mesh: Mesh, ncells: int, query_maxlen: int):
    """`cells(..., with_scores=True)` for one query, its centroid scores written into S [1, P, Lq] (donated: XLA
    reuses the buffer for the output). The same numbers; what differs is where S lives: a fresh 8 MiB output
    per query (at 65,536 centroids) is a fresh mapping under `streamed_mmap.return_freed_memory`, page-faulted
    in on every call, while a buffer kept from the last query is already resident."""

    def shard(Q, S, a):
        new, c, n = _cells_batch(Q, a, ncells=ncells, query_maxlen=query_maxlen, query_chunk=1, with_scores=True)
        return S.at[:].set(new), c, n

    return run_sharded(shard, mesh, (Q, S), arrays, (P(), P()), (P(), P(), P()))


@functools.partial(jax.jit, static_argnames=("mesh", "max_entries", "query_chunk"))
def candidates(cells: jax.Array, arrays: IndexArrays, *, mesh: Mesh, max_entries: int, query_chunk: int = 0):
    """Stage 2: cells [B, Lq * ncells] -> (local candidates [D, B, max_entries] (unique, ascending, then the
    shard's sentinel position), #candidates [D, B], #candidate embeddings [D, B])."""
    fn = functools.partial(candidates_one, max_entries=max_entries)

    def shard(cells, a):
        entries, n_cand, n_emb = map_queries(lambda c: fn(c, a), cells, query_chunk)
        return entries[None], jax.lax.all_gather(n_cand, AXIS), jax.lax.all_gather(n_emb, AXIS)

    out_specs = (P(AXIS), P(), P())  # the counts the host reads: replicated
    return run_sharded(shard, mesh, (cells,), arrays, (P(),), out_specs)
