"""WARP-style retrieval (Scheerer et al., SIGIR 2025): score compressed embeddings cluster by cluster,
without a PLAID candidate/pruning/exact pipeline.

For a query Q [Lq, dim]:
  S = C . Q^T                                      centroid scores [P, Lq]
  each query token i probes its `nprobe` best clusters (WARP_SELECT); m_i, the score of its best cluster
  not probed, stands in for a document none of whose embeddings lie in a probed cluster ("imputed").
  Every embedding e of a probed cluster c is scored against every token that probed c:
      s(i, e) = (S[c, i] + q_i . r_e) * inv_norm_e  =  q_i . normalize(c + r_e)
  which is exactly the decompressed-and-normalised dot product of the exact stage.
  A document's score is sum_i (max over its scored embeddings for token i, else m_i); the top k win.
Every probed embedding is touched once: a cluster probed by several tokens is scored against all of them
in one [rows, dim] x [dim, Lq] product, masked to the tokens that probed it.

Scoring: the residual bytes are unpacked through `byte_table` (one 256-entry row per byte) and multiplied
with all query tokens, rather than looked up in per-token tables of bucket-weight sums (LUT_i[j][byte]):
XLA:CPU gathers cost far more per element than matmul FLOPs, the LUT form needs one gather per (token,
byte) while unpacking needs one per byte, and query tokens share most probed clusters.

Layout (`WarpArrays`, built at load time from the colbert-ai-compatible codes on disk): each shard's
embeddings sorted by cluster (stable: passage order inside a cluster), with their passage position,
packed residual bytes and 1/||c + r||. Reduction: a pass over the probed embeddings' passages marks the
candidates (a dense [N] mask: no sort), the candidates get dense slots, and a second pass scores and
max-reduces each (slot, token) with one scatter. Static shapes: the host sizes the candidate slots and
embedding streams with power-of-two buckets from a first, cheap call (`probe`); the streams run with
dynamic trip counts (`segments.stream`).

Sharding: like `plaid`, passages are split into contiguous shards over the `shard` mesh axis; each shard
scores its own passages (imputation depends only on the replicated centroids, so a passage's score is the
same on any number of devices) and the global top k comes from the shards' local top k (all_gather).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from colbert_jax.search.arrays import AXIS, NEG_INF, ShardedArrays
from colbert_jax.search.candidates import top_cells
from colbert_jax.search.segments import stream
from pallas_kernels.decompress import byte_table

__all__ = ["WarpArrays", "build_arrays", "probe", "search", "rank", "default_nprobe"]


def default_nprobe(k: int) -> int:
    """Clusters probed per query token when the caller sets none, chosen on the 1,000 quality queries
    (stdlib_2k, 4,096 clusters): 64 matches PLAID's overlap@10 with exact MaxSim at k=10; at k=100 PLAID
    re-scores 256 documents exactly and 192 is needed to match its overlap@10 (`docs/benchmarks.md`)."""
    return 64 if k <= 10 else 192


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WarpArrays(ShardedArrays):
    """Device arrays of the WARP engine. Per-shard fields have a leading shard axis split over the mesh;
    passage positions in a shard are local (add `first` for the global position)."""

    centroids: jax.Array  # f32 [P, dim] (replicated)
    bucket_weights: jax.Array  # f32 [2^nbits] (replicated)
    residuals: jax.Array  # u8 [D, E + 1, dim * nbits / 8], cluster order (last row: padding)
    passage: jax.Array  # i32 [D, E + 1]: local passage position of each row (padding: N)
    inv_norms: jax.Array  # f32 [D, E + 1]: 1 / ||centroid + residual|| of each row
    cluster_offsets: jax.Array  # i32 [D, P + 1]: first row of each cluster (last: E)
    cluster_sizes: jax.Array  # i32 [D, P + 1]: rows of each cluster (last: 0, the padding cluster)
    cluster_passages: jax.Array  # i32 [D, P + 1]: distinct passages of each cluster (last: 0)
    first: jax.Array  # i32 [D]: global position of the shard's first passage
    count: jax.Array  # i32 [D]: the shard's passages
    # N, the most passages in a shard (static: it sizes the candidate mask)
    passages: int = dataclasses.field(metadata=dict(static=True))


def build_arrays(index, mesh: Mesh) -> WarpArrays:
    """The cluster-major layout of `index` (an `Index`), its passages split into one contiguous shard per
    device of `mesh` (balanced by embeddings), placed on the devices."""
    n_shards = mesh.size
    num_p, num_n = index.num_partitions, index.num_passages
    doclens = np.asarray(index.doclens)
    cum = np.concatenate([[0], np.cumsum(doclens, dtype=np.int64)])
    cuts = np.searchsorted(cum, np.linspace(0, cum[-1], n_shards + 1)[1:-1], side="left")
    bounds = np.clip(np.concatenate([[0], cuts, [num_n]]), 0, num_n)
    bounds = np.maximum.accumulate(bounds)
    codes_all = np.asarray(index.codes)
    residuals_all = index.residuals
    inv_all = 1.0 / np.maximum(index.codec.norms(codes_all, np.asarray(residuals_all)), 1e-12)
    shards = []
    for s in range(n_shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        codes = codes_all[cum[lo] : cum[hi]].astype(np.int64)
        order = np.argsort(codes, kind="stable")  # cluster-major; passages ascending inside a cluster
        passage = np.repeat(np.arange(hi - lo, dtype=np.int32), doclens[lo:hi])[order]
        sorted_codes = codes[order]
        sizes = np.bincount(sorted_codes, minlength=num_p)
        new = np.ones(len(order), bool)
        new[1:] = (sorted_codes[1:] != sorted_codes[:-1]) | (passage[1:] != passage[:-1])
        distinct = np.bincount(sorted_codes[new], minlength=num_p)
        shards.append(
            dict(
                residuals=np.asarray(residuals_all[cum[lo] : cum[hi]])[order],
                passage=passage,
                inv_norms=inv_all[cum[lo] : cum[hi]][order].astype(np.float32),
                sizes=sizes,
                distinct=distinct,
                first=lo,
                count=hi - lo,
            )
        )
    e_max = max(len(x["passage"]) for x in shards)
    n_max = max(x["count"] for x in shards)

    def pad(a, size, value):
        return np.concatenate([a, np.full((size - len(a), *a.shape[1:]), value, a.dtype)])

    stacked = {
        "residuals": [pad(x["residuals"], e_max + 1, 0) for x in shards],
        "passage": [pad(x["passage"], e_max + 1, n_max) for x in shards],
        "inv_norms": [pad(x["inv_norms"], e_max + 1, 0.0) for x in shards],
        "cluster_offsets": [np.concatenate([[0], np.cumsum(x["sizes"])]).astype(np.int32) for x in shards],
        "cluster_sizes": [np.concatenate([x["sizes"], [0]]).astype(np.int32) for x in shards],
        "cluster_passages": [np.concatenate([x["distinct"], [0]]).astype(np.int32) for x in shards],
        "first": [np.int32(x["first"]) for x in shards],
        "count": [np.int32(x["count"]) for x in shards],
    }
    sharded = NamedSharding(mesh, P(AXIS))
    replicated = NamedSharding(mesh, P())
    return WarpArrays(
        centroids=jax.device_put(index.codec.centroids, replicated),
        bucket_weights=jax.device_put(index.codec.bucket_weights, replicated),
        **{k: jax.device_put(np.stack(v), sharded) for k, v in stacked.items()},
        passages=int(n_max),
    )


# -- stage 1: WARP_SELECT -------------------------------------------------------------------------
def _select_one(Q, a: WarpArrays, nprobe: int):
    """-> (probed (token, cluster) pairs sorted by cluster: tokens [Lq * n], clusters [Lq * n], their
    centroid scores [Lq * n]; the distinct clusters [Lq * n] (padding: P); imputed scores [Lq])."""
    num_p, lq = a.centroids.shape[0], Q.shape[0]
    n = min(nprobe, num_p)
    S = jnp.dot(a.centroids, Q.T, precision=jax.lax.Precision.HIGHEST)  # [P, Lq]
    ids = top_cells(S, n)  # [Lq, n]
    probed = jnp.zeros((num_p + 1, lq), bool).at[ids, jnp.arange(lq)[:, None]].set(True)
    # The best cluster not probed, as a masked max rather than an (n + 1)-th top_k column: XLA:CPU
    # rewrites a sliced top_k into a full sort of every centroid score.
    imputed = jnp.where(probed[:num_p], NEG_INF, S).max(axis=0)
    imputed = jnp.where(imputed > NEG_INF, imputed, 0.0)  # every cluster probed: never used
    clusters = ids.reshape(-1)
    tokens = jnp.repeat(jnp.arange(lq, dtype=jnp.int32), n)
    # Cluster order: a cluster probed by several tokens is read while its rows are still in cache.
    clusters, tokens = jax.lax.sort((clusters, tokens), num_keys=2)
    unique = jnp.unique(clusters, size=clusters.shape[0], fill_value=num_p)
    return tokens, clusters, S[clusters, tokens], unique, imputed


@functools.partial(jax.jit, static_argnames=("mesh", "nprobe"))
def probe(Q, arrays: WarpArrays, *, mesh: Mesh, nprobe: int):
    """Stage 1: Q [B, Lq, dim] -> (pairs: tokens, clusters, centroid scores [B, Lq * nprobe]; distinct
    clusters [B, Lq * nprobe]; imputed [B, Lq]; rows to score [D, B]; bound on candidate passages [D, B]),
    a shard's counts for the host to size `search`."""

    def shard(Q, a):
        a = a.local()
        out = jax.lax.map(lambda q: _select_one(q, a, nprobe), Q)
        _, clusters, _, unique, _ = out
        n_rows = a.cluster_sizes[clusters].sum(1)
        n_cand = jnp.minimum(a.cluster_passages[unique].sum(1), a.count)
        return (*out, n_rows[None], n_cand[None])

    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(P(), arrays.specs()),
        out_specs=(P(), P(), P(), P(), P(), P(AXIS), P(AXIS)),
        check_vma=False,
    )(Q, arrays)


# -- stage 2: scoring and reduction ---------------------------------------------------------------
def _lut(Q, weights, nbits: int):
    """Per query token and packed byte position, the residual's dot product for each byte value:
    [Lq, nbytes, 256], LUT[i, j, b] = sum over the dimensions d that byte j packs of q_i[d] * w[bucket]."""
    table = byte_table(weights, nbits)  # [256, 8 // nbits], the byte's dimensions first to last
    lq, dim = Q.shape
    return jnp.einsum("bt,qjt->qjb", table, Q.reshape(lq, dim * nbits // 8, -1), precision=jax.lax.Precision.HIGHEST)


def _search_one(
    Q, tokens, clusters, centroid_scores, unique, imputed, real, a: WarpArrays, *, max_candidates, k, nbits, chunk
):
    """Local top k of one query in one shard: (global positions [k'] (-1: none), scores [k'])."""
    n_rows = a.passage.shape[0]  # E + 1 (the last: padding)
    num_slots = a.passages + 1  # local passages + the padding passage N
    lq = Q.shape[0]
    kk = min(k, max_candidates)

    def run(_):
        def mark(seen, seg, row, valid):
            return seen.at[jnp.where(valid, a.passage[row], num_slots - 1)].set(True)

        seen = stream(a.cluster_sizes[unique], a.cluster_offsets[unique], chunk, jnp.zeros(num_slots, bool), mark)
        seen = seen.at[-1].set(False)
        slot_of = jnp.cumsum(seen, dtype=jnp.int32) - 1  # candidate slot of each marked passage
        (cand,) = jnp.nonzero(seen, size=max_candidates, fill_value=num_slots - 1)
        lut = _lut(Q, a.bucket_weights, nbits)
        nbytes = lut.shape[1]
        lut = lut.reshape(-1)
        byte_base = jnp.arange(nbytes, dtype=jnp.int32) * 256

        def score(best, seg, row, valid):
            row = jnp.where(valid, row, n_rows - 1)
            token = tokens[seg]
            # WARP's scoring: one scalar lookup per (token, byte), no decompressed vector.
            idx = (token * (nbytes * 256))[:, None] + byte_base[None] + a.residuals[row].astype(jnp.int32)
            sim = (centroid_scores[seg] + lut[idx].sum(1)) * a.inv_norms[row]
            flat = jnp.where(valid, slot_of[a.passage[row]] * lq + token, max_candidates * lq)
            return best.at[flat].max(sim, mode="drop")

        pairs = stream(
            a.cluster_sizes[clusters],
            a.cluster_offsets[clusters],
            chunk,
            jnp.full(max_candidates * lq, NEG_INF),
            score,
        ).reshape(max_candidates, lq)
        total = jnp.where(pairs > NEG_INF, pairs, imputed[None]).sum(1)
        total = jnp.where(jnp.arange(max_candidates) < seen.sum(), total, NEG_INF)
        best, slots = jax.lax.top_k(total, kk)
        return jnp.where(best > NEG_INF, cand[slots] + a.first, -1), best

    def skip(_):
        return jnp.full((kk,), -1, jnp.int32), jnp.full((kk,), NEG_INF, jnp.float32)

    return jax.lax.cond(real, run, skip, None)


@functools.partial(jax.jit, static_argnames=("mesh", "max_candidates", "k", "nbits", "chunk"))
def search(
    Q,
    tokens,
    clusters,
    centroid_scores,
    unique,
    imputed,
    real,
    arrays: WarpArrays,
    *,
    mesh: Mesh,
    max_candidates: int,
    k: int,
    nbits: int,
    chunk: int = 8192,
):
    """Stage 2, one query at a time: Q [B, Lq, dim] and `probe`'s outputs, real [B] bool (False: padding,
    skipped) -> (global passage positions [B, k'] (-1: none), scores [B, k'] (-inf: none)), best first,
    k' = min(k, max_candidates). `max_candidates` bounds a shard's candidate passages for every query of
    the batch (from `probe`)."""
    fn = functools.partial(_search_one, max_candidates=max_candidates, k=k, nbits=nbits, chunk=chunk)

    def shard(Q, tokens, clusters, centroid_scores, unique, imputed, real, a):
        a = a.local()
        pos, sc = jax.lax.map(lambda x: fn(*x, a), (Q, tokens, clusters, centroid_scores, unique, imputed, real))
        # Shards in order: ties go to the lower position, as on one device.
        all_sc = jax.lax.all_gather(sc, AXIS, axis=1).reshape(sc.shape[0], -1)
        all_pos = jax.lax.all_gather(pos, AXIS, axis=1).reshape(pos.shape[0], -1)
        best, idx = jax.lax.top_k(all_sc, min(k, all_sc.shape[1]))
        return jnp.where(best > NEG_INF, jnp.take_along_axis(all_pos, idx, 1), -1), best

    return jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(P(),) * 7 + (arrays.specs(),),
        out_specs=(P(), P()),
        check_vma=False,
    )(Q, tokens, clusters, centroid_scores, unique, imputed, real, arrays)


def rank(
    Q: np.ndarray, arrays: WarpArrays, *, mesh: Mesh, nprobe: int, k: int, nbits: int, n_real: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Q [B, Lq, dim] (rows past `n_real`: padding, skipped) -> (global passage positions [B, k''] (-1: none),
    scores [B, k''] (-inf: none)), best first; k'' = k unless a shard holds fewer passages than k. One host
    round trip between the stages, for the size of the candidate slots (a power of two)."""
    *selected, _, n_cand = probe(Q, arrays, mesh=mesh, nprobe=nprobe)
    n_cand = int(jax.device_get(n_cand).max())
    max_candidates = min(1 << (max(n_cand, k, 1) - 1).bit_length(), arrays.passages + 1)
    real = np.arange(len(Q)) < (len(Q) if n_real is None else n_real)
    out = search(Q, *selected, real, arrays, mesh=mesh, max_candidates=max_candidates, k=k, nbits=nbits)
    return jax.device_get(out)
