"""PLAID search over a memory-mapped index (`load_index_with_mmap=True`): the host side, which reads from
the index's files only what a batch needs, so that the residuals stay on disk.

The streamed path (`plaid`) is cut where the residuals are first needed:
1. `expand_cells` (host): the IVF entries of each query's probed cells, read list by list from disk;
   `plaid.streamed_survivors` (stages 2-5 on the device, codes only) -> each query's ndocs // 4 survivors.
2. `gather` (host): reads just the survivors' rows (codes, residuals) from the index's chunk files and
   lays them out like a small index, one slot per (query, survivor), with their norms.
3. `plaid.streamed_exact` (stage 6, one small program): decompress + MaxSim over the gathered rows.

The survivors are the ones `plaid.search_streamed` keeps (the same functions select them), and stage 6
computes the same numbers (a centroid's score is its row of C . Q^T, computed for the gathered codes only), so
rankings equal the in-memory streamed path's. Working memory per batch: the codes on the device, one query's
centroid scores at a time, and the survivors' rows; one batch at a time per process (`one_batch_at_a_time`).
A single query's stage 1 writes S into the previous query's buffer (`candidates.cells_into`): under
`return_freed_memory` a fresh 8 MiB buffer would be page-faulted in on every call.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

import jax
import numpy as np

from colbert_jax.index import Index
from colbert_jax.indexing.codec import COMPRESS_BATCH, _norms, _pad_to, _pow2

__all__ = [
    "expand_cells",
    "gather",
    "return_freed_memory",
    "one_batch_at_a_time",
    "GATHER_KEYS",
    "MIN_GATHER_ROWS",
]

GATHER_KEYS = ("codes", "residuals", "doclens", "offsets", "first", "count")  # + "inv_norms" with centroids
MIN_GATHER_ROWS = 4096  # gathered rows per shard are padded to a power of two at least this: few programs


def return_freed_memory(threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Asks glibc's malloc to give freed memory back to the system: blocks of `threshold` bytes and more get
    their own mappings, unmapped when freed (by default glibc raises that threshold to the largest block freed
    so far, up to 32 MiB, so search's per-query buffers, 8 MiB of centroid scores at 65,536 centroids, stay in
    the heap after use), and at most `arenas` heaps serve all threads (each thread that searches a batch would
    otherwise get a heap of its own that keeps what it freed). Process-wide; returns whether it applied (glibc
    only)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold))) & bool(mallopt(M_ARENA_MAX, int(arenas)))


_RUNNING = threading.Lock()


@contextlib.contextmanager
def one_batch_at_a_time(batch: int) -> Iterator[None]:
    """Runs a batch's stages 2-6 alone in the process, then hands the heaps' free pages back to the system
    (`malloc_trim`): after every batch of more than one query, and after a single query once the resident
    set has grown `TRIM_GROWTH` since the last trim.

    `Searcher.search_all` keeps two batches in flight on the CPU (one encodes while the other searches):
    their search working sets (IVF entries, a query's centroid scores, the survivors' rows) would otherwise
    peak together. The trim: buffers under the mmap threshold that a batch freed stay in glibc's heaps as
    holes until something of their size reuses them. Not after every single query: the next one would
    page-fault the same memory back in, and one query's time is where that shows."""
    global _trimmed_at
    with _RUNNING:
        yield
        if batch > 1 or _resident() > _trimmed_at + TRIM_GROWTH:
            _malloc_trim()
            _trimmed_at = _resident()


TRIM_GROWTH = 16 << 20  # after single queries, trim once the resident set has grown this much since the last
_trimmed_at = 0


def _resident() -> int:
    """The process's resident set in bytes (`/proc/self/statm`; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def expand_cells(index: Index, cells: np.ndarray, real: np.ndarray, max_entries: int) -> np.ndarray:
    """Stage 2's IVF lookup on the host, from the index's IVF on disk (only the probed lists are read): cells
    [B, C] (padded with P) -> the entries of each real query's lists, global passage positions [B, W] (-1:
    none; W = max_entries, or the next power of two that holds the longest query's entries)."""
    lengths, offsets = index.ivf_bounds
    L = np.where(np.asarray(real)[:, None], lengths[cells], 0)  # [B, C]
    totals = L.sum(axis=1)
    width = max(int(max_entries), 1 << int(max(int(totals.max()), 1) - 1).bit_length())
    flat = L.reshape(-1)
    total = int(flat.sum())
    rows = np.repeat(offsets[cells].reshape(-1) - (np.cumsum(flat) - flat), flat) + np.arange(total)
    query = np.repeat(np.arange(len(cells)), totals)
    at = np.arange(total) - np.repeat(np.cumsum(totals) - totals, totals)  # the entry's slot in its query's row
    out = np.full((len(cells), width), -1, np.int32)
    out[query, at] = index.ivf_rows[rows]
    return out


def gather(
    index: Index,
    surv: np.ndarray,
    firsts: np.ndarray,
    sentinel: int,
    centroids: jax.Array | None = None,
    weights: jax.Array | None = None,
    min_rows: int = MIN_GATHER_ROWS,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Reads the survivors' rows from `index` (memory-mapped: only these rows are read) into arrays laid out
    like the index's device arrays (`GATHER_KEYS`, each with a leading shard axis).

    surv [D, B, n]: each shard's local survivor positions (`sentinel`: none); firsts [D]: each shard's first
    global position; centroids, weights: the codec's, on the device (for the rows' norms, computed as the
    index's own are, by `codec._norms`). Each shard's survivors become slots 0..M-1 (M = B * n; slot M is the
    sentinel) and its `first` is d * (M + 1), so a position that stage 6 returns names its shard and slot.
    Returns (survivors renumbered into slots [D, B, n] int32, the arrays, slot -> passage position [D * (M + 1)]
    (-1: none)). Rows per shard are padded to a power of two (at least `min_rows`)."""
    D, B, n = surv.shape
    M = B * n
    valid = surv < sentinel
    glob = np.where(valid, surv + firsts[:, None, None], 0).reshape(D, M)
    lens = np.where(valid.reshape(D, M), index.doclens[glob], 0).astype(np.int64)  # [D, M]
    totals = lens.sum(axis=1)
    e_max = max(min_rows, 1 << int(max(int(totals.max()), 1) - 1).bit_length())
    # Every shard's rows, concatenated: the index's rows of each slot's passage, in slot order.
    flat = lens.reshape(-1)
    starts = index.offsets[glob.reshape(-1)]
    skip = starts - np.concatenate([[0], np.cumsum(flat)[:-1]])
    rows = np.repeat(skip, flat) + np.arange(int(flat.sum()), dtype=np.int64)
    codes = index.codes[rows].astype(np.int32)
    residuals = index.residuals[rows]
    out = {
        "codes": np.full((D, e_max + 1), index.num_partitions, np.int32),
        "residuals": np.zeros((D, e_max + 1, residuals.shape[1]), np.uint8),
        "doclens": np.zeros((D, M + 1), np.int32),
        "first": (np.arange(D) * (M + 1)).astype(np.int32),
        "count": np.full(D, M, np.int32),
    }
    if centroids is not None:
        # In the blocks the index's own norms were computed in: a bounded working set, and the same values.
        norms = np.zeros(len(rows), np.float32)
        for lo in range(0, len(rows), COMPRESS_BATCH):
            k, r = codes[lo : lo + COMPRESS_BATCH], residuals[lo : lo + COMPRESS_BATCH]
            size = COMPRESS_BATCH if len(rows) > COMPRESS_BATCH else _pow2(len(k))
            block = _norms(_pad_to(k, size), _pad_to(r, size), centroids, weights, nbits=index.nbits)
            norms[lo : lo + len(k)] = np.asarray(block)[: len(k)]
        inv = (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)
        out["inv_norms"] = np.zeros((D, e_max + 1), np.float32)
    bounds = np.concatenate([[0], np.cumsum(totals)])
    for d in range(D):  # a loop over shards
        lo, hi = bounds[d], bounds[d + 1]
        out["codes"][d, : hi - lo] = codes[lo:hi]
        out["residuals"][d, : hi - lo] = residuals[lo:hi]
        if centroids is not None:
            out["inv_norms"][d, : hi - lo] = inv[lo:hi]
    out["doclens"][:, :M] = lens
    out["offsets"] = np.concatenate([np.zeros((D, 1), np.int64), np.cumsum(out["doclens"][:, :-1], axis=1)], axis=1)
    out["offsets"] = out["offsets"].astype(np.int32)
    renumbered = np.where(valid, np.arange(M).reshape(1, B, n), M).astype(np.int32)
    slots = np.concatenate([np.where(valid.reshape(D, M), glob, -1), np.full((D, 1), -1)], axis=1).reshape(-1)
    return renumbered, out, slots
