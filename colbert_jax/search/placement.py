"""Where an index's passages live during search: one contiguous shard per device of the search mesh, over
one process or many.

Every process computes the same shard bounds from `doclens` (small: every process reads it) and reads from
disk only the rows of the shards on its own devices (codes, residuals; the IVF is rebuilt from its own
codes). Sizes that depend on other processes' shards (the longest IVF, the IVF-entry bounds) come from a
small all-gather, so every process pads its shards to the same global shapes and runs the same programs.

In a multi-process runtime (`colbert_jax.distributed`) every process must call the search in step with the
same arguments; the query embeddings searched are process 0's (`broadcast_queries`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from colbert_jax import native
from colbert_jax.index import Index
from colbert_jax.indexing.ivf import build_ivf
from colbert_jax.search.arrays import AXIS, IndexArrays

CODES_BLOCK = 1 << 22  # codes read per step while placing (16 MiB as stored)
SHARDED = (
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

__all__ = [
    "search_mesh",
    "shard_bounds",
    "place_index",
    "open_lazily",
    "broadcast_queries",
    "multi_process",
    "require_single_process",
]


STAGE1_ENV = "COLBERT_JAX_STAGE1"
STAGE1_MODES = ("auto", "f32", "bf16", "int8")


def stage1_precision(on_cpu: bool) -> str:
    """The operands of a CPU search's stage 1 product, "f32", "bf16" or "int8", set by `COLBERT_JAX_STAGE1`
    ("auto" when unset; accelerators always "f32", XLA's float32 product):
      "int8": each centroid and query token quantized to int8 with its own scale (`native.centroid_scores_int8`
        where the kernels are built with AVX-512 VNNI, else XLA's product of the same codes);
      "bf16": both rounded to bfloat16 (`native.centroid_scores_bf16` where the CPU has AVX-512 BF16, else XLA's
        product of the same rounded operands);
      "auto": "f32" where there is AMX-BF16 (its tiles run the float32-class product), else "int8" where its
        kernel runs, else "bf16" where its kernel runs, else "f32".

    With "bf16" or "int8", stages 1-5 rank centroids and candidates by the approximate scores (about 1e-3 per
    token on unit vectors for bfloat16, a few 1e-3 for int8); stage 6 recomputes q . c in float32 for the
    survivors' rows (`exact_scoring`), so final scores are float32's."""
    mode = os.environ.get(STAGE1_ENV, "auto").strip().lower() or "auto"
    if mode not in STAGE1_MODES:
        raise ValueError(f"{STAGE1_ENV} must be one of {STAGE1_MODES}, got {mode!r}")
    if not on_cpu:
        return "f32"
    if mode != "auto":
        return mode
    if native.amx_bf16_available():
        return "f32"
    if native.stage1_int8_available():
        return "int8"
    return "bf16" if native.avx512_bf16_available() else "f32"


def multi_process() -> bool:
    """Whether this process is one of several in a JAX runtime (`colbert_jax.distributed.initialize`)."""
    return jax.process_count() > 1


def require_single_process(what: str, reason: str = "it reads passages from every shard") -> None:
    """Raises ValueError naming `what` (and why) when several processes share the index."""
    if multi_process():
        raise ValueError(
            f"{what} is not available when the index is split over {jax.process_count()} processes "
            f"({reason}): run it as one process"
        )


def search_mesh(devices: Sequence[jax.Device] | None, num_passages: int) -> Mesh:
    """The 1-D mesh the index's passages are split over: `devices`, else all devices of all processes (ordered
    by process, then local id). One process drops devices beyond one per passage; several processes keep
    them all, since every process must own part of the mesh to take part (their surplus shards are empty)."""
    if devices is None:
        devices = jax.devices() if multi_process() else jax.local_devices()
    devices = list(devices)
    if not multi_process():
        devices = devices[: max(1, min(len(devices), num_passages))]
    return Mesh(np.asarray(devices), (AXIS,))


def shard_bounds(doclens: np.ndarray, n_shards: int) -> np.ndarray:
    """Passage bounds [n_shards + 1] of contiguous shards balanced by embeddings (trailing shards of a tiny
    index may be empty)."""
    N = len(doclens)
    cum = np.concatenate([[0], np.cumsum(doclens, dtype=np.int64)])
    cuts = np.searchsorted(cum, np.linspace(0, cum[-1], n_shards + 1)[1:-1], side="left")
    bounds = np.unique(np.clip(np.concatenate([[0], cuts, [N]]), 0, N))
    return np.concatenate([bounds, np.full(n_shards + 1 - len(bounds), N, bounds.dtype)]).astype(np.int64)


def open_lazily(index: Index) -> Index:
    """`index` with codes and residuals memory-mapped (read only where indexed), for a process that must read
    only its own shards. An index with updates is read whole (its rows are a replay of its log): warned."""
    if index.has_updates:
        warnings.warn(
            f"{index.path} has adds or deletes since it was built: every process reads all of its codes and "
            "residuals (`colbert-jax compact` it so that each reads only its own shard)",
            stacklevel=3,
        )
    return index if index.mmap else index.with_mmap()


def broadcast_queries(Q: np.ndarray) -> np.ndarray:
    """Process 0's query embeddings on every process (unchanged in one process). The batch is padded to a
    power of two for the transfer, so that it compiles a bounded number of programs."""
    if not multi_process():
        return Q
    size = 1 << max(0, int(len(Q) - 1).bit_length())
    padded = np.zeros((size, *Q.shape[1:]), Q.dtype)
    padded[: len(Q)] = Q
    return np.asarray(multihost_utils.broadcast_one_to_all(padded))[: len(Q)]


def _global_max(local: np.ndarray) -> np.ndarray:
    """The element-wise maximum of `local` over all processes (the same shape on each)."""
    if not multi_process():
        return local
    return np.asarray(multihost_utils.process_allgather(local)).max(axis=0)


def padding_code(num_partitions: int, codes_dtype) -> int:
    """The code the padding rows of placed codes hold: P (no partition's id) where it fits the dtype, else 0 (an
    index of exactly 65,536 partitions in uint16). Every reader masks padding rows by its documents' lengths
    before it reads a code, so the value never reaches a score."""
    return num_partitions if num_partitions <= np.iinfo(codes_dtype).max else 0


def place_index(
    index: Index,
    mesh: Mesh,
    residuals: bool = True,
    codes_dtype: type = np.int32,
    ivf: bool = True,
    split_centroids: bool = False,
    blocked_centroids: bool = False,
    bf16_centroids: bool = False,
    int8_centroids: bool = False,
) -> tuple[IndexArrays, list[np.ndarray]]:
    """Splits the index's passages into one contiguous shard per mesh device (balanced by embeddings) and
    places each shard this process owns on its device (residuals and their norms only with `residuals`).
    `codes_dtype` np.uint16 (at most 65,536 partitions) halves the codes for a reader that masks padding
    rows rather than reading their code (`pruning.approx_streamed`): the padding code is then P, or 0 when P
    does not fit. `ivf` False leaves out the IVF's entries ("ivf", "ivf_offsets"; the lengths stay) for a
    reader that reads the probed lists from disk (`streamed_mmap.expand_cells`); the fields left out are None.
    `split_centroids` also places the centroids' two bfloat16 terms (`native.split_centroids`), for the centroid
    scores on the tile unit (CPUs with AMX-BF16: `candidates.centroid_scores`); `blocked_centroids` places them in
    groups of 8 (`native.block_centroids`) for the native float32 product (other CPUs); `bf16_centroids` places
    them rounded to bfloat16 and packed (`native.block_centroids_bf16`) for stage 1 on bfloat16 operands
    (`stage1_precision` "bf16"); `int8_centroids` places them quantized to int8 and packed, with their terms
    (`native.block_centroids_int8`), for stage 1 on int8 operands (`stage1_precision` "int8").

    Returns the global arrays (`IndexArrays`, leading shard axis over the mesh) and, as a one-element
    list, the element-wise maximum over shards of the cumulative IVF list lengths sorted longest first (static
    bounds for the streamed path). Reads from disk only the rows of this process's shards.
    """
    devices = list(mesh.devices.flat)
    n_shards = len(devices)
    P = index.num_partitions
    doclens_all = index.doclens
    cum = np.concatenate([[0], np.cumsum(doclens_all, dtype=np.int64)])
    bounds = shard_bounds(doclens_all, n_shards)
    # Sizes every process knows from doclens alone; the IVF's depend on the codes, so they are gathered.
    n_max = int(np.diff(bounds).max())
    e_max = int(np.diff(cum[bounds]).max())
    me = jax.process_index()
    local = [s for s, d in enumerate(devices) if d.process_index == me]
    if not local:
        raise ValueError(f"process {me} has no device in the search mesh: every process must own a shard")
    if np.dtype(codes_dtype) != np.int32 and P - 1 > np.iinfo(codes_dtype).max:
        raise ValueError(f"codes_dtype {np.dtype(codes_dtype)} cannot hold the ids of {P} partitions")
    pad_code = padding_code(P, codes_dtype)
    shards = {}
    for s in local:
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        doclens = doclens_all[lo:hi]
        # Read block by block into the padded array of the device's dtype: no whole copy as stored (int32).
        padded = np.full(e_max + 1, pad_code, codes_dtype)
        for at in range(cum[lo], cum[hi], CODES_BLOCK):
            stop = min(at + CODES_BLOCK, cum[hi])
            padded[at - cum[lo] : stop - cum[lo]] = index.codes[at:stop]
        codes = padded[: cum[hi] - cum[lo]]
        if n_shards == 1 and not ivf:  # only the lengths: the entries are not placed
            ivf_rows, lengths = np.zeros(0, np.int32), index.ivf_lengths
        elif n_shards == 1:  # the index's own lists (the same, built the same way): no sort of every code
            ivf_rows, lengths = index.ivf, index.ivf_lengths
        else:
            ivf_rows, lengths = build_ivf(codes, doclens, P)
        shards[s] = dict(
            first=lo,
            doclens=doclens,
            codes=padded,
            residuals=np.asarray(index.residuals[cum[lo] : cum[hi]]) if residuals else None,
            ivf=ivf_rows,
            ivf_lengths=lengths,
        )
    del codes, padded, ivf_rows, lengths  # held by `shards` only, so that each is freed once padded
    entry_bound = np.zeros(P, np.int64)
    i_local = 1
    for x in shards.values():
        entry_bound = np.maximum(entry_bound, np.cumsum(np.sort(x["ivf_lengths"])[::-1]))
        i_local = max(i_local, len(x["ivf"]))
    # int32 for the gather (JAX's default integers); a bound past 2^31 entries is no usable static size anyway
    local_sizes = np.minimum(np.concatenate([[i_local], entry_bound]), np.iinfo(np.int32).max).astype(np.int32)
    gathered = _global_max(local_sizes).astype(np.int64)
    i_max, entry_bound = int(gathered[0]), gathered[1:]

    def pad(a, size, value):
        return np.concatenate([a, np.full((size - len(a), *a.shape[1:]), value, a.dtype)])

    skip = (set() if residuals else {"residuals", "inv_norms"}) | (set() if ivf else {"ivf", "ivf_offsets"})
    per_shard: dict[str, dict[int, np.ndarray]] = {k: {} for k in SHARDED if k not in skip}
    for s, x in shards.items():
        doclens = pad(x["doclens"].astype(np.int32), n_max + 1, 0)
        per_shard["doclens"][s] = doclens
        per_shard["offsets"][s] = np.concatenate([[0], np.cumsum(doclens[:-1])]).astype(np.int32)
        per_shard["codes"][s] = x["codes"]  # padded as read
        if residuals:
            per_shard["residuals"][s] = pad(x["residuals"], e_max + 1, 0)
            norms = index.codec.norms(x["codes"][: len(x["residuals"])], x["residuals"])
            per_shard["inv_norms"][s] = pad(1.0 / np.maximum(norms, 1e-12), e_max + 1, 0.0).astype(np.float32)
        if ivf:
            per_shard["ivf"][s] = pad(x["ivf"], i_max, 0)
            per_shard["ivf_offsets"][s] = np.concatenate([[0], np.cumsum(x["ivf_lengths"])]).astype(np.int32)
        per_shard["ivf_lengths"][s] = np.concatenate([x["ivf_lengths"], [0]]).astype(np.int32)
        per_shard["first"][s] = np.int32(x["first"])
        per_shard["count"][s] = np.int32(len(x["doclens"]))
        x.clear()  # the shard's arrays as read: freed once padded (one host copy at a time, not two)
    sharded = NamedSharding(mesh, PartitionSpec(AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())

    def assemble(parts: dict[int, np.ndarray]) -> jax.Array:
        first = np.asarray(next(iter(parts.values())))
        pieces = [jax.device_put(np.asarray(parts[s])[None], devices[s]) for s in local]
        return jax.make_array_from_single_device_arrays((n_shards, *first.shape), sharded, pieces)

    placed = {k: assemble(per_shard.pop(k)) for k in list(per_shard)}  # each host copy freed once placed
    split = native.split_centroids(index.codec.centroids) if split_centroids else None
    blocked = native.block_centroids(index.codec.centroids) if blocked_centroids else None
    packed = native.block_centroids_bf16(index.codec.centroids) if bf16_centroids else None
    int8, terms = native.block_centroids_int8(index.codec.centroids) if int8_centroids else (None, None)
    arrays = IndexArrays(
        centroids=jax.device_put(index.codec.centroids, replicated),
        bucket_weights=jax.device_put(index.codec.bucket_weights, replicated),
        centroids_split=None if split is None else jax.device_put(split, replicated),
        centroids_blocked=None if blocked is None else jax.device_put(blocked, replicated),
        centroids_bf16=None if packed is None else jax.device_put(packed, replicated),
        centroids_int8=None if int8 is None else jax.device_put(int8, replicated),
        centroids_int8_terms=None if terms is None else jax.device_put(terms, replicated),
        **placed,
    )
    return arrays, [entry_bound]
