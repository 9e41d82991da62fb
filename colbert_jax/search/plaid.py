"""The PLAID engine: its stages composed into the programs `Searcher` runs, batched over queries and sharded
over devices (the `shard` mesh axis, `arrays.py`).

The stages, one module each (mirroring colbert-ai 0.2.22 `colbert/search/`):
  1-2 `candidates`     Q -> centroid scores S -> probed cells -> unique candidate passages
  4-5 `pruning`        centroid interaction over the candidates' codes -> ndocs, then ndocs // 4 survivors
  6   `exact_scoring`  decompress + MaxSim of the survivors -> top k
Each shard ranks its own passages; every selection is global over the shards (all_gather of the local
winners), so results equal a single device's: one code path for 1..N devices.

Two ways to run stages 2-6 after `candidates.cells`:
- staged (`candidates.candidates`, `pruning.select`, `exact_scoring.score`): host round trips between the
  stages carry only sizes, so that each stage gets bucketed static shapes; embeddings packed ("jnp", vmapped
  over queries on accelerators) or each document padded for the Pallas kernels ("pallas", GPUs).
- streamed (the CPU default, below): one query at a time, the candidates' and survivors' embeddings streamed
  in fixed chunks with dynamic trip counts. Its static shapes depend only on the batch bucket, k and the
  bucketed IVF entry count, so a server's stream of batches of all sizes compiles a handful of programs, and
  a padding query costs nothing. `search_streamed` runs stages 2-6 as one program; over a memory-mapped
  index, `streamed_survivors` stops at stage 5 and `streamed_exact` scores the survivors' rows the host read
  from disk (`streamed_mmap`), with the same per-query functions.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from colbert_jax import native
from colbert_jax.index import Index
from colbert_jax.search import placement, streamed_mmap
from colbert_jax.search.arrays import AXIS, NEG_INF, IndexArrays, bucket, if_real, map_queries, pow2, run_sharded
from colbert_jax.search.candidates import (
    candidates,
    candidates_one,
    cells,
    cells_into,
    cells_one,
    centroid_scores,
    unique_candidates,
)
from colbert_jax.search.exact_scoring import exact_streamed, reduce, score, top_k
from colbert_jax.search.pruning import select, survivors_streamed

__all__ = [
    "cells",
    "candidates",
    "select",
    "score",
    "search_streamed",
    "streamed_survivors",
    "streamed_exact",
    "streamed_chunk",
    "working_set_per_query",
    "Params",
    "PlaidEngine",
    "search_fused",
]


def working_set_per_query(*, max_candidates: int, max_embeddings: int, dim: int, query_maxlen: int) -> int:
    """Rough peak bytes of `pruning.select` or `exact_scoring.score` for one query (for choosing `query_chunk`)."""
    return 4 * (3 * max_embeddings * max(query_maxlen, dim) + 8 * max_candidates)


def streamed_chunk(max_entries: int) -> int:
    """The streamed path's default candidate embeddings per step: twice the IVF entries, within 4,096..16,384:
    bigger steps pay off when there are many candidates, smaller ones waste less padding when there are few."""
    return min(max(2 * max_entries, 4096), 16384)


# -- one query ------------------------------------------------------------------------------------
def _unique_candidates(source, a: IndexArrays, width: int) -> jax.Array:
    """Stage 2 for one query: its unique local candidates [width]. `source` is its probed cells when the IVF's
    entries are on the device, else the entries of its cells as the host read them from disk (global
    positions, -1: none; `streamed_mmap.expand_cells`)."""
    if a.ivf is not None:
        return candidates_one(source, a, max_entries=width)[0]
    local = source - a.first
    valid = (source >= 0) & (local >= 0) & (local < a.count)
    return unique_candidates(jnp.where(valid, local, 0), valid, a, max_entries=width)[0]


def _survivors_one(Q, S, source, threshold, a: IndexArrays, *, width: int, ndocs: int, chunk: int):
    """Stages 2-5 for one query -> (S, local survivors [ndocs // 4]). S None: recomputed here."""
    S = centroid_scores(Q, a, Q.shape[0]) if S is None else S
    entries = _unique_candidates(source, a, width)
    return S, survivors_streamed(S, entries, threshold, a, ndocs=ndocs, chunk=chunk)


def _exact_one(Q, S, survivors, a: IndexArrays, *, k: int, nbits: int, clamp: bool, chunk: int):
    """Stage 6 for one query: the global top k of its survivors (S None: rows gathered from disk)."""
    return top_k(reduce(exact_streamed(Q, S, survivors, a, chunk, nbits), clamp), survivors, a, k)


def _rank_one(Q, S, source, threshold, a: IndexArrays, *, width, ndocs, chunk, k, nbits, clamp, exact_chunk):
    """Stages 2-6 for one query (S None: recomputed) -> (global positions, scores)."""
    S, survivors = _survivors_one(Q, S, source, threshold, a, width=width, ndocs=ndocs, chunk=chunk)
    return _exact_one(Q, S, survivors, a, k=k, nbits=nbits, clamp=clamp, chunk=exact_chunk)


def _no_ranking(kk: int) -> Callable:
    """What a padding query returns from stage 6: no positions (-1), no scores (-inf), kk of each."""
    return lambda a: (jnp.full((kk,), -1, jnp.int32), jnp.full((kk,), NEG_INF, jnp.float32))


def _each_query(
    one: Callable,
    skipped: Callable,
    arrays: IndexArrays,
    mesh: Mesh,
    batched: tuple,
    real,
    shared: tuple = (),
    *,
    sharded_in: tuple[int, ...] = (),
    sharded_out: bool = False,
):
    """`one(*query's slice of batched, *shared, local arrays)` for each real query of the batch, one at a time,
    `skipped(local arrays)` for padding queries. The batched inputs numbered in `sharded_in` have a leading
    shard axis (split over the mesh, dropped inside the shard); with `sharded_out` the output gets one (else
    it is replicated)."""
    n = len(batched)

    def shard(*args):
        *args, a = args
        xs = tuple(x[0] if i in sharded_in else x for i, x in enumerate(args[:n]))

        def query(x):
            *qx, r = x
            return if_real(r, lambda *y: one(*y, *args[n + 1 :], a), skipped(a), *qx)

        out = map_queries(query, (*xs, args[n]), 1)
        return out[None] if sharded_out else out

    specs = tuple(P(AXIS) if i in sharded_in else P() for i in range(n)) + (P(),) * (1 + len(shared))
    out_specs = P(AXIS) if sharded_out else P()
    return run_sharded(shard, mesh, (*batched, real, *shared), arrays, specs, out_specs)


# -- the streamed programs ------------------------------------------------------------------------
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
    arrays: IndexArrays,
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
    """Stages 2-6 in one call after `candidates.cells`, one query at a time.

    Q [B, Lq, dim]; S [B, P, Lq] from `cells`, or None to recompute it per query (a batch's S can be large:
    512 MB for 64 queries at 65,536 centroids); cells [B, Lq * ncells]; real [B] bool (False: padding) ->
    (global positions [B, min(k, ndocs//4)] (-1: none), scores (-inf: none)). `chunk`: candidate embeddings
    per step (default `streamed_chunk(max_entries)`).
    """
    chunk = streamed_chunk(max_entries) if chunk is None else chunk
    rank = functools.partial(
        _rank_one, width=max_entries, ndocs=ndocs, chunk=chunk, k=k, nbits=nbits, clamp=clamp, exact_chunk=exact_chunk
    )
    return _each_query(rank, _no_ranking(min(k, ndocs // 4)), arrays, mesh, (Q, S, cells), real, (threshold,))


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "ncells", "max_entries", "ndocs", "k", "nbits", "clamp", "chunk", "exact_chunk"),
)
def search_fused(
    Q,
    real,
    threshold,
    arrays: IndexArrays,
    *,
    mesh: Mesh,
    ncells: int,
    max_entries: int,
    ndocs: int,
    k: int,
    nbits: int,
    clamp: bool = False,
    chunk: int | None = None,
    exact_chunk: int = 512,
):
    """Stages 1-6 in one call, one query at a time: `cells` and `search_streamed` without the host round trip
    between them, and with each query's centroid scores computed once (the two programs compute a batch's
    twice, as S of a whole batch would not stay in the cache between them).

    `max_entries` is a guess (the IVF entries of a query's cells are known only after stage 1): Q [B, Lq, dim],
    real [B] -> (global positions [B, min(k, ndocs//4)], scores, IVF entries [B, D] per query and shard). A
    query whose entries exceed max_entries in some shard was ranked from a truncated candidate list: the caller
    reruns it (`PlaidEngine.rank`); every other query's ranking is the two programs'."""
    chunk = streamed_chunk(max_entries) if chunk is None else chunk
    lq = Q.shape[1]
    shards = mesh.shape[AXIS]

    rank = functools.partial(
        _rank_one, width=max_entries, ndocs=ndocs, chunk=chunk, k=k, nbits=nbits, clamp=clamp, exact_chunk=exact_chunk
    )

    def one(Q, threshold, a):
        S, c, n = cells_one(Q, a, ncells=ncells, query_maxlen=lq)
        return (*rank(Q, S, c, threshold, a), jax.lax.all_gather(n, AXIS))

    def skipped(a):
        pos, scores = _no_ranking(min(k, ndocs // 4))(a)
        return pos, scores, jnp.zeros((shards,), jnp.int32)

    return _each_query(one, skipped, arrays, mesh, (Q,), real, (threshold,))


@functools.partial(jax.jit, static_argnames=("mesh", "ndocs", "chunk"))
def streamed_survivors(Q, S, entries, real, threshold, arrays: IndexArrays, *, mesh: Mesh, ndocs: int, chunk: int):
    """Stages 2-5 after `candidates.cells`, one query at a time, from the codes alone (`arrays` needs neither
    residuals nor the IVF's entries).

    Q [B, Lq, dim]; S [B, P, Lq] or None (recomputed per query); entries [B, W]: the IVF entries of each
    query's cells (`streamed_mmap.expand_cells`); real [B] bool (False: padding, skipped) -> local survivors
    [D, B, ndocs // 4] (descending positions, then each shard's sentinel position)."""
    width = entries.shape[1]

    def one(Q, S, entries, threshold, a):
        return _survivors_one(Q, S, entries, threshold, a, width=width, ndocs=ndocs, chunk=chunk)[1]

    def skipped(a):
        return jnp.full((ndocs // 4,), a.sentinel, jnp.int32)

    return _each_query(one, skipped, arrays, mesh, (Q, S, entries), real, (threshold,), sharded_out=True)


@functools.partial(jax.jit, static_argnames=("mesh", "k", "nbits", "clamp", "chunk"))
def streamed_exact(
    Q, survivors, real, arrays: IndexArrays, *, mesh: Mesh, k: int, nbits: int, clamp: bool = False, chunk: int = 512
):
    """Stage 6 over rows gathered from disk (`streamed_mmap.gather`), one query at a time: Q [B, Lq, dim],
    survivors [D, B, n] (slots), real [B] -> (slot positions [B, min(k, n)] (-1: none), scores (-inf: none))."""

    def one(Q, survivors, a):
        return _exact_one(Q, None, survivors, a, k=k, nbits=nbits, clamp=clamp, chunk=chunk)

    skipped = _no_ranking(min(k, survivors.shape[-1]))
    return _each_query(one, skipped, arrays, mesh, (Q, survivors), real, sharded_in=(1,))


# -- the host driver ------------------------------------------------------------------------------
RANK_MEMORY_BUDGET = 256 << 20  # bytes of per-device working set for one batch of the staged select/score
GROUPS = 4  # size-sorted groups per batch for the staged select/score
_GUESS_HISTORY = 256  # queries whose IVF-entry needs size `search_fused`'s width


@dataclasses.dataclass(frozen=True)
class Params:
    """One search's PLAID parameters (`searcher.search_params`)."""

    k: int
    ncells: int
    threshold: float
    ndocs: int


@dataclasses.dataclass(eq=False)
class PlaidEngine:
    """PLAID over one index placed on a mesh: queries -> (global passage positions, scores), by the staged or
    the streamed path, over the index in memory or memory-mapped (residuals read per batch from disk).

    Args:
      index: the `Index` (memory-mapped with `mmap`).
      mesh: the search mesh (`placement.search_mesh`).
      implementation: "streamed", "jnp" or "pallas" (module docstring).
      kernels: the Pallas kernels' `implementation` ("pallas", or "auto" to fall back to their jnp twins).
      on_cpu: one query at a time in the staged maps (XLA:CPU lowers batched gathers poorly).
      clamp: colbert-ai's CPU scoring (`exact_scoring`).
      mmap: leave the residuals on disk.
    """

    index: Index
    mesh: Mesh
    implementation: str
    kernels: str
    on_cpu: bool
    clamp: bool
    mmap: bool

    def __post_init__(self):
        index, mmap, implementation = self.index, self.mmap, self.implementation
        # Up to 65,536 partitions the codes are placed as uint16 on the CPU and for the memory-mapped path: every
        # reader masks padding rows before it reads a code (at exactly 65,536 they hold 0, `placement.padding_code`),
        # and stages 4-6 read each candidate's codes from memory, where half the bytes is half that traffic (and
        # 2 bytes an embedding less to hold). The memory-mapped path also reads the probed IVF lists from disk
        # (`streamed_mmap.expand_cells`): no IVF entries placed.
        mapped = mmap and implementation == "streamed"
        small = (mapped or self.on_cpu) and index.num_partitions <= 1 << 16
        precision = placement.stage1_precision(self.on_cpu)
        approximate = precision != "f32"
        self.arrays, self._entry_bounds = placement.place_index(
            index,
            self.mesh,
            residuals=not mmap,
            codes_dtype=np.uint16 if small else np.int32,
            ivf=not mapped,
            split_centroids=self.on_cpu and native.amx_bf16_available() and not approximate,
            blocked_centroids=self.on_cpu
            and not native.amx_bf16_available()
            and native.scores_f32_vectorized()
            and not approximate,
            bf16_centroids=precision == "bf16",
            int8_centroids=precision == "int8",
        )
        longest = int(index.doclens.max())
        # The kernels pad documents to power-of-two lengths (Triton blocks); padding here saves that copy.
        self.max_doclen = pow2(longest) if implementation == "pallas" else -(-longest // 8) * 8
        self._mmap_scores: jax.Array | None = None  # the last single query's centroid scores (`_mmap_cells`)
        # (ncells, query_maxlen) -> the IVF entries the latest queries needed, and `search_fused`'s width from them
        self._entries_needed: dict[tuple[int, int], collections.deque] = {}
        self._entries_guess: dict[tuple[int, int], int] = {}
        self._guess_lock = threading.Lock()

    def max_entries(self, ncells: int, query_maxlen: int) -> int:
        """Static bound on the IVF entries of one query's cells in any shard: its longest Lq * ncells lists."""
        bounds = [b[min(query_maxlen * ncells, len(b)) - 1] for b in self._entry_bounds]
        return pow2(max(int(max(bounds)), 1))

    def allowed_mask(self, positions: np.ndarray) -> jax.Array:
        """A filter as the sharded device mask stage 2 reads: bool [D, N_shard + 1] (the sentinel: False)."""
        first, count = (np.asarray(x) for x in jax.device_get((self.arrays.first, self.arrays.count)))
        mask = np.zeros(self.arrays.doclens.shape, bool)
        for s in range(len(first)):  # a loop over shards
            local = positions[(positions >= first[s]) & (positions < first[s] + count[s])] - first[s]
            mask[s, local] = True
        return jax.device_put(mask, NamedSharding(self.mesh, P(AXIS)))

    @staticmethod
    def pass_scores(batch: int) -> bool:
        """Whether the streamed path reuses stage 1's centroid scores rather than recomputing them per query.
        Measured on 2 cores at 65,536 centroids: one query is faster reusing them; batches (even of 16) are
        faster recomputing, since a batch's S (8 MB per query) leaves the cache between the stages."""
        return batch == 1

    def cells(self, Q, params: Params, query_maxlen: int, with_scores: bool):
        """Stage 1 as the search runs it: (S or None, cells, IVF entries per shard and query, on the host)."""
        S, c, n_entries = cells(
            Q,
            self.arrays,
            mesh=self.mesh,
            ncells=min(params.ncells, self.index.num_partitions),
            query_maxlen=query_maxlen,
            query_chunk=1 if self.on_cpu else 0,
            with_scores=with_scores,
        )
        return S, c, jax.device_get(n_entries)  # a host round trip for one size: the IVF entries to expand

    def rank(
        self, Q: np.ndarray, params: Params, query_maxlen: int, real: np.ndarray, allowed: jax.Array | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Q [B, Lq, dim], real [B] (False: padding) -> (global positions [B, min(k, ndocs // 4)] (-1: none),
        scores (-inf: none)) on the host. `allowed`: a filter mask (`allowed_mask`), applied at stage 2."""
        streamed = self.implementation == "streamed"
        guess = self._entries_guess.get((min(params.ncells, self.index.num_partitions), query_maxlen))
        if streamed and not self.mmap and not self.pass_scores(len(Q)) and guess is not None:
            return self.fused(Q, real, params, guess, allowed)
        if self.mmap and streamed and len(Q) == 1:  # S written into the last query's buffer
            S, c, n_entries = self._mmap_cells(Q, params, query_maxlen)
        else:
            S, c, n_entries = self.cells(Q, params, query_maxlen, not streamed or self.pass_scores(len(Q)))
        if streamed:
            if not self.mmap and len(Q) > 1:
                self._guess_entries(params, query_maxlen, n_entries.max(axis=0)[real])
            return self.streamed(Q, S, c, real, params, pow2(n_entries.max()), allowed)
        return self._staged(Q, S, c, n_entries, params, query_maxlen, allowed)

    def entries_sized(self, params: Params, query_maxlen: int) -> bool:
        """Whether earlier queries have sized `search_fused`'s width for these parameters (`_guess_entries`)."""
        return (min(params.ncells, self.index.num_partitions), query_maxlen) in self._entries_guess

    def _guess_entries(self, params: Params, query_maxlen: int, needed: np.ndarray) -> None:
        """Records what these queries needed (`needed`: each query's IVF entries, the most of any shard) and sets
        `search_fused`'s width for the next batches: the bucket that nine in ten of the latest `_GUESS_HISTORY`
        queries fit. Sized for most queries rather than the largest, since every query of a batch pays for the
        width; the few larger ones are reranked. Over a history rather than the last batch, so that the width
        (a compiled shape) stays put whatever the batch sizes: a single query alone would set it to its own
        needs, and the next query, needing more, would be ranked twice."""
        if needed.size:
            key = (min(params.ncells, self.index.num_partitions), query_maxlen)
            with self._guess_lock:  # batches in flight on several threads
                history = self._entries_needed.setdefault(key, collections.deque(maxlen=_GUESS_HISTORY))
                history.extend(int(n) for n in needed)
                latest = np.fromiter(history, np.int64, len(history))
            self._entries_guess[key] = pow2(int(np.quantile(latest, 0.9, method="higher")))

    def fused(self, Q, real, params: Params, max_entries: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
        """A batch by `search_fused` (stages 1-6 in one program), its IVF entries guessed from earlier batches
        (`_guess_entries`): the queries whose entries did not fit are ranked again, by the two programs that
        size the entries first."""
        query_maxlen = Q.shape[1]
        pos, scores, n_entries = jax.device_get(
            search_fused(
                Q,
                real,
                np.float32(params.threshold),
                self.arrays.filtered(allowed),
                mesh=self.mesh,
                ncells=min(params.ncells, self.index.num_partitions),
                max_entries=max_entries,
                ndocs=max(params.ndocs, 4),
                k=params.k,
                nbits=self.index.nbits,
                clamp=self.clamp,
            )
        )
        needed = n_entries.max(axis=1)
        self._guess_entries(params, query_maxlen, needed[real])
        again = np.nonzero(real & (needed > max_entries))[0]
        if len(again):
            size = pow2(len(again))  # a batch bucket: padding queries cost nothing
            Q_again = np.zeros((size, *Q.shape[1:]), Q.dtype)
            Q_again[: len(again)] = Q[again]
            real_again = np.arange(size) < len(again)
            S, c, n = self.cells(Q_again, params, query_maxlen, self.pass_scores(size))
            p2, s2 = self.streamed(Q_again, S, c, real_again, params, pow2(n.max()), allowed)
            pos, scores = np.array(pos), np.array(scores)
            pos[again], scores[again] = p2[: len(again)], s2[: len(again)]
        return pos, scores

    def streamed(self, Q, S, c, real, params: Params, max_entries: int, allowed=None):
        """Stages 2-6 by the streamed programs: in one program in memory; over a memory-mapped index, stages
        2-5 (codes only), the survivors' rows read from disk, then stage 6 on them. -> (positions, scores)."""
        arrays = self.arrays.filtered(allowed)
        if not self.mmap:
            return jax.device_get(
                search_streamed(
                    Q,
                    S,
                    c,
                    real,
                    np.float32(params.threshold),
                    arrays,
                    mesh=self.mesh,
                    max_entries=max_entries,
                    ndocs=max(params.ndocs, 4),
                    k=params.k,
                    nbits=self.index.nbits,
                    clamp=self.clamp,
                )
            )
        with streamed_mmap.one_batch_at_a_time(len(Q)):  # the buffers below are freed before it trims
            out = self._streamed_mmap(Q, S, c, real, params, max_entries, arrays)
        if S is not None and len(Q) == 1:  # no longer read (the results are on the host): the next query's
            self._mmap_scores = S
        return out

    def _mmap_cells(self, Q: np.ndarray, params: Params, query_maxlen: int):
        """Stage 1 of one query over a memory-mapped index (`candidates.cells_into`): its centroid scores go
        into the buffer the last query's left (`_mmap_scores`, taken, so a concurrent query makes its own), not
        into a fresh one."""
        shape = (1, self.arrays.centroids.shape[0], query_maxlen)
        S, self._mmap_scores = self._mmap_scores, None
        dtype = np.dtype(self.arrays.scores_dtype)
        if S is None or S.shape != shape or S.dtype != dtype:
            S = jax.device_put(np.zeros(shape, dtype), NamedSharding(self.mesh, P()))
        ncells = min(params.ncells, self.index.num_partitions)
        S, c, n_entries = cells_into(Q, S, self.arrays, mesh=self.mesh, ncells=ncells, query_maxlen=query_maxlen)
        return S, c, jax.device_get(n_entries)

    def _streamed_mmap(self, Q, S, c, real, params: Params, max_entries: int, arrays: IndexArrays):
        """`streamed` over a memory-mapped index: stages 2-5, the survivors' rows read from disk, stage 6."""
        threshold, ndocs, nbits = np.float32(params.threshold), max(params.ndocs, 4), self.index.nbits
        if self.on_cpu and self.index.codec.centroids.base is None:
            # On the CPU a device array is host memory: let the codec read the device's centroids rather than
            # keep its own copy (32 MiB at 65,536 centroids).
            self.index.share_centroids(self.arrays.centroids)
        entries = streamed_mmap.expand_cells(self.index, np.asarray(jax.device_get(c)), real, max_entries)
        surv = streamed_survivors(
            Q, S, entries, real, threshold, arrays, mesh=self.mesh, ndocs=ndocs, chunk=streamed_chunk(entries.shape[1])
        )
        survivors, gathered, slots = self._gather_survivors(surv, norms=False)
        pos, sc = jax.device_get(
            streamed_exact(Q, survivors, real, gathered, mesh=self.mesh, k=params.k, nbits=nbits, clamp=self.clamp)
        )
        return np.where(pos >= 0, slots[np.maximum(pos, 0)], -1), sc

    def _staged(self, Q, S, c, n_entries, params: Params, query_maxlen: int, allowed=None):
        """Stages 2-6 by the staged programs. Host round trips carry only sizes: each stage gets static shapes
        that fit its queries. Queries are sorted by size and ranked in groups, so that a few large queries do
        not pad all the others."""
        ndocs = max(params.ndocs, 4)
        entries, n_cand, n_emb = candidates(
            c,
            self.arrays.filtered(allowed),
            mesh=self.mesh,
            max_entries=bucket(n_entries.max()),
            query_chunk=1 if self.on_cpu else 0,
        )
        n_cand, n_emb = jax.device_get((n_cand, n_emb))
        common = dict(mesh=self.mesh, max_doclen=self.max_doclen, implementation=self.implementation)
        if self.implementation == "pallas":
            common["kernels"] = self.kernels
        kk = min(params.k, ndocs // 4)
        positions = np.full((len(Q), kk), -1, np.int64)
        scores = np.full((len(Q), kk), -np.inf, np.float32)
        for group in _size_groups(n_emb.max(axis=0), GROUPS if len(Q) >= 2 * GROUPS else 1):
            whole = len(group) == len(Q)  # then group is arange(len(Q))
            S_g = S if whole else S[group]
            entries_g = entries if whole else entries[:, group]
            Q_g = Q if whole else Q[group]
            sizes = dict(max_candidates=bucket(n_cand[:, group].max()), max_embeddings=bucket(n_emb[:, group].max()))
            survivors, n_surv = select(
                S_g,
                entries_g,
                np.float32(params.threshold),
                self.arrays,
                ndocs=ndocs,
                **sizes,
                **common,
                query_chunk=self._query_chunk(sizes, query_maxlen),
            )
            surv_emb = bucket(jax.device_get(n_surv).max())
            scored, slots = self.arrays, None
            if self.mmap:
                survivors, scored, slots = self._gather_survivors(survivors)
            pos, sc = jax.device_get(
                score(
                    Q_g,
                    S_g,
                    survivors,
                    scored,
                    max_embeddings=surv_emb,
                    k=params.k,
                    nbits=self.index.nbits,
                    clamp=self.clamp,
                    **common,
                    query_chunk=self._query_chunk(
                        dict(max_candidates=ndocs // 4, max_embeddings=surv_emb), query_maxlen
                    ),
                )
            )
            if slots is not None:  # compact slots -> passage positions
                pos = np.where(pos >= 0, slots.reshape(-1)[np.maximum(pos, 0)], -1)
            positions[group], scores[group] = pos, sc
        return positions, scores

    def _gather_survivors(self, survivors: jax.Array, norms: bool = True) -> tuple[jax.Array, IndexArrays, np.ndarray]:
        """For a memory-mapped index: reads the survivors' rows (codes, residuals) from disk into small arrays
        laid out like the index's (`streamed_mmap.gather`), so stage 6 runs unchanged on them (their norms
        only with `norms`: `streamed_exact` computes its own). Returns the survivors renumbered into them,
        the arrays (on the mesh), and slot -> passage position [D * (M + 1)]."""
        surv = np.asarray(jax.device_get(survivors))  # [D, B, n] local positions, sentinel-padded
        firsts = np.asarray(jax.device_get(self.arrays.first))
        codec = (self.arrays.centroids, self.arrays.bucket_weights) if norms else (None, None)
        renumbered, stacked, slots = streamed_mmap.gather(self.index, surv, firsts, self.arrays.sentinel, *codec)
        sharded = NamedSharding(self.mesh, P(AXIS))
        placed = {k: jax.device_put(v, sharded) for k, v in stacked.items()}
        arrays = IndexArrays(
            centroids=self.arrays.centroids,
            bucket_weights=self.arrays.bucket_weights,
            centroids_split=self.arrays.centroids_split,
            centroids_blocked=self.arrays.centroids_blocked,
            centroids_bf16=self.arrays.centroids_bf16,
            centroids_int8=self.arrays.centroids_int8,
            centroids_int8_terms=self.arrays.centroids_int8_terms,
            **placed,
        )
        return jax.device_put(renumbered, sharded), arrays, slots

    def _query_chunk(self, sizes: dict, query_maxlen: int) -> int:
        """Queries per step of the select/score maps: 1 on CPU, else as many as the memory budget allows."""
        if self.on_cpu:
            return 1
        per_query = working_set_per_query(**sizes, dim=self.index.dim, query_maxlen=query_maxlen)
        return pow2(max(1, RANK_MEMORY_BUDGET // per_query) + 1) // 2

    def entry_buckets(self, batches: list[np.ndarray], params: Params, query_maxlen: int, below: int = 1) -> list[int]:
        """The streamed path's IVF-entry buckets for queries like `batches` (each a batch the search runs): powers
        of two from the fewest entries they need (divided by `below`) to twice the most, never past what the
        index can produce."""
        counts = [self.cells(Q, params, query_maxlen, self.pass_scores(len(Q)))[2].max(axis=0) for Q in batches]
        n_entries = np.concatenate(counts)  # per query, the most of any shard
        lo = max(pow2(n_entries.min()) // below, 1)
        hi = min(2 * pow2(n_entries.max()), self.max_entries(params.ncells, query_maxlen))
        return [1 << b for b in range(lo.bit_length() - 1, hi.bit_length())]

    def compile_streamed(self, size: int, params: Params, query_maxlen: int, buckets: list[int]) -> None:
        """Compiles the streamed programs (`search_streamed`, and `search_fused` for batches) for batches of
        `size` at each IVF-entry bucket, by running padding queries only (no search work)."""
        zeros = np.zeros((size, query_maxlen, self.index.dim), np.float32)
        S, c, _ = self.cells(zeros, params, query_maxlen, self.pass_scores(size))
        for max_entries in buckets:
            jax.block_until_ready(self.streamed(zeros, S, c, np.zeros(size, bool), params, max_entries))
            if not self.mmap and not self.pass_scores(size):  # batches run `search_fused` once a guess exists
                self.fused(zeros, np.zeros(size, bool), params, max_entries)


def _size_groups(sizes: np.ndarray, groups: int) -> list[np.ndarray]:
    """Query indices sorted by size, split into `groups` equal parts (one group: the batch in order)."""
    if groups <= 1:
        return [np.arange(len(sizes))]
    order = np.argsort(sizes, kind="stable")
    return [g for g in np.array_split(order, groups) if len(g)]
