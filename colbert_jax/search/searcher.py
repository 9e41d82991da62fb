"""`Searcher`: queries -> rankings over a PLAID index.

The host side of search: encode queries, batch them into power-of-two buckets, run the jitted PLAID
stages (`plaid.py`) with static sizes chosen from each batch's candidate counts, and map passage
positions back to the collection's pids.

Search parameters default by k exactly as colbert-ai's `dense_search` chooses them (ncells,
centroid_score_threshold, ndocs = 1, 0.5, 256 for k <= 10; 2, 0.45, 1024 for k <= 100;
4, 0.4, max(4k, 4096) above), but per call: colbert-ai writes the first call's values into its config so
they stick for later calls with other k (a quirk we deliberately do not copy). Values set in the config
or passed to a call win.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import colbert_jax.search.warp as warp
from colbert_jax.checkpoint import load_checkpoint
from colbert_jax.config import ColBERTConfig
from colbert_jax.errors import needs_option
from colbert_jax.index import Index
from colbert_jax.indexing.build import model_fingerprint
from colbert_jax.model import QUERY_BATCH_STEP, ColBERTModel, batch_bucket, batch_buckets
from colbert_jax.runtime import enable_compilation_cache
from colbert_jax.search import explain, placement, plaid, streamed_mmap
from colbert_jax.search.arrays import IndexArrays
from colbert_jax.search.exact import exact_search
from colbert_jax.search.ranking import Ranking

__all__ = ["Searcher", "search_params", "QueryError", "QueryTruncatedWarning"]

MAX_BATCH = 64
_BATCHES_IN_FLIGHT = 3  # search_all on the CPU


class QueryError(ValueError):
    """A query is empty, too long, or has the wrong shape."""


class QueryTruncatedWarning(UserWarning):
    """Text queries longer than query_maxlen were cut (once per call, with how many)."""


def search_params(k: int, config: ColBERTConfig) -> tuple[int, float, int]:
    """(ncells, centroid_score_threshold, ndocs) for k, as colbert-ai chooses them; config values win."""
    if k <= 10:
        defaults = (1, 0.5, 256)
    elif k <= 100:
        defaults = (2, 0.45, 1024)
    else:
        defaults = (4, 0.4, max(4 * k, 4096))
    ncells = config.ncells if config.ncells is not None else defaults[0]
    threshold = config.centroid_score_threshold if config.centroid_score_threshold is not None else defaults[1]
    ndocs = config.ndocs if config.ndocs is not None else defaults[2]
    return ncells, threshold, ndocs


def _pid_array(values: Any, what: str = "pids") -> np.ndarray:
    """int64 pids from integers; floats, booleans and strings are refused (converted, 17.9 would be pid 17 and
    True pid 1: another passage), as `Index.positions` and `Indexer.delete` refuse them."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise TypeError(f"{what} must be integers, got an array of {values.dtype}")
        return values.reshape(-1).astype(np.int64)
    if isinstance(values, str | bytes):
        raise TypeError(f"{what} must be a collection of integers, got {type(values).__name__} {values[:20]!r}")
    items = list(values)
    bad = next((v for v in items if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer)), None)
    if bad is not None:
        raise TypeError(f"{what} must be integers, got {bad!r} ({type(bad).__name__})")
    return np.array(items, np.int64).reshape(-1)


def _pad_batch(Q: np.ndarray, batch_size: int) -> np.ndarray:
    """Q padded with zero queries to its batch bucket (`model.batch_bucket`, at most batch_size): few compiled
    batch shapes, as for the encoder."""
    size = batch_bucket(len(Q), batch_size, 1, QUERY_BATCH_STEP)
    return np.concatenate([Q, np.zeros((size - len(Q), *Q.shape[1:]), np.float32)])


class Searcher:
    """Searches one index.

    Args:
      index: index directory (or an opened `Index`).
      checkpoint: checkpoint directory, Hub id or `ColBERTModel`; default: the one recorded in the index.
      config: a `ColBERTConfig` whose explicitly set fields win over the index's and checkpoint's.
      exact: brute-force MaxSim over all passages instead of PLAID (also per call).
      truncate: cut text queries longer than query_maxlen, as colbert-ai does, with one
        `QueryTruncatedWarning` per call saying how many were cut; False raises `QueryError` instead.
      allow_other_checkpoint: search with a checkpoint other than the one that built the index.
      clamp_maxsim: score like colbert-ai on CPU, where each query token's maximum is clamped at 0
        (its GPU path, and our default, keep negative maxima).
      implementation: "auto" ("streamed" on CPU; "jnp" on TPU; "pallas" on GPU, where a kernel that fails
        to compile is replaced by its jnp twin, logged once; `COLBERT_JAX_STRICT_KERNELS=1` raises instead),
        "streamed", "jnp" or "pallas" (see `colbert_jax.search.plaid`; "pallas" never falls back).
      engine: "plaid" (candidates, pruning, exact re-scoring; see `colbert_jax.search.plaid`) or "warp"
        (WARP: each query token's `ncells` best clusters scored straight from the packed residuals, missing
        tokens imputed; see `colbert_jax.search.warp`; ncells defaults to `warp.default_nprobe(k)`). Filtered
        searches (`pids=`, `where=`) use PLAID either way.
      devices: devices to split the index's passages over (default: all local devices); results are the
        same for any number of devices.
      **overrides: config keys, e.g. `ncells=2, ndocs=512`.
    """

    def __init__(
        self,
        index: str | os.PathLike | Index,
        checkpoint: str | os.PathLike | ColBERTModel | None = None,
        *,
        config: ColBERTConfig | None = None,
        exact: bool = False,
        truncate: bool = True,
        allow_other_checkpoint: bool = False,
        clamp_maxsim: bool = False,
        implementation: str = "auto",
        engine: str = "plaid",
        devices: Sequence[jax.Device] | None = None,
        **overrides,
    ):
        if placement.multi_process():  # each process reads only its own shards: no checksum of whole arrays
            self.index = placement.open_lazily(index if isinstance(index, Index) else Index.open(index, verify=False))
        else:
            self.index = index if isinstance(index, Index) else Index.open(index)
        explicit = {**(config.model_dump(exclude_unset=True) if config is not None else {}), **overrides}
        # colbert-ai precedence: checkpoint metadata < index config < user config.
        # How queries are encoded is the searcher's choice, not the index's (its passages are float32 either way):
        # an index records the query_quantization it was built with, which would otherwise pin its searches.
        index_config = {
            k: v for k, v in self.index.config.to_dict().items() if k not in ("checkpoint", "query_quantization")
        }
        if checkpoint is None:
            checkpoint = self.index.metadata.get("checkpoint", {}).get("path") or self.index.config.checkpoint
            if not checkpoint:
                raise needs_option(
                    ValueError,
                    f"{self.index.path}: the index records no checkpoint",
                    argument="checkpoint=DIR",
                    flag="--checkpoint DIR",
                    purpose="choose one",
                )
            if not Path(checkpoint).expanduser().is_absolute() and not Path(checkpoint).expanduser().exists():
                # indexes built before paths were recorded absolute name the checkpoint relative to where the
                # build ran
                raise needs_option(
                    FileNotFoundError,
                    f"{self.index.path} records its checkpoint as the relative path {checkpoint!r}, which does not "
                    f"exist from {Path.cwd()}",
                    argument="checkpoint=DIR",
                    flag="--checkpoint DIR",
                    purpose="give it",
                )
        if isinstance(checkpoint, ColBERTModel):
            model = checkpoint
        else:
            model = load_checkpoint(checkpoint)
        if model.config.dim != self.index.dim:
            raise ValueError(
                f"the checkpoint has dim {model.config.dim} but the index was built with dim "
                f"{self.index.dim}: use the checkpoint that built the index"
            )
        recorded = self.index.metadata.get("checkpoint", {}).get("fingerprint")
        if recorded and not allow_other_checkpoint and model_fingerprint(model) != recorded:
            raise needs_option(
                ValueError,
                f"the checkpoint ({model.config.checkpoint}) is not the one that built the index "
                f"({self.index.metadata['checkpoint'].get('path')}): its weights or settings differ",
                argument="allow_other_checkpoint=True",
                flag="--allow-other-checkpoint",
                purpose="search with it anyway",
            )
        self._allow_other_checkpoint = allow_other_checkpoint
        settings = {**index_config, **explicit, "checkpoint": model.config.checkpoint}
        self.config = model.config.replace(**settings)
        self.model = model if self.config == model.config else model.replace_config(**settings)
        # load_index_with_mmap (colbert-ai's key): residuals stay on disk; only the survivors' rows are read, per
        # batch (see `_gather_survivors`). Codes go to the device: every candidate needs them.
        self.mmap = bool(self.config.load_index_with_mmap)
        if self.mmap and not self.index.mmap:
            self.index = self.index.with_mmap()
        if self.mmap:  # a bounded resident set is the point: search's freed buffers go back to the system
            streamed_mmap.return_freed_memory()
        self.exact = exact
        self.truncate = truncate
        self.clamp_maxsim = clamp_maxsim
        if implementation not in ("auto", "streamed", "pallas", "jnp"):
            raise ValueError(f"implementation must be 'auto', 'streamed', 'pallas' or 'jnp', got {implementation!r}")
        self._auto = implementation == "auto"
        self._cpu = jax.default_backend() == "cpu"
        if self._auto:
            implementation = "streamed" if self._cpu else "pallas" if jax.default_backend() == "gpu" else "jnp"
        self.implementation = implementation
        if engine not in ("plaid", "warp"):
            raise ValueError(f"engine must be 'plaid' or 'warp', got {engine!r}")
        if engine == "warp" and self.mmap:
            raise ValueError("engine='warp' scores the residuals in memory: not with load_index_with_mmap")
        self.engine = engine
        self._warp_arrays = None
        self._plaid: plaid.PlaidEngine | None = None
        self._collection = None
        if self.mmap:
            placement.require_single_process("load_index_with_mmap", "it reads survivors' rows from every shard")
        if self.engine == "warp":
            placement.require_single_process("engine='warp'", "its cluster-major layout is built from the whole index")
        self._devices = list(devices) if devices is not None else None
        self.mesh = placement.search_mesh(self._devices, self.index.num_passages)
        self._exact_arrays = None
        enable_compilation_cache()

    def __repr__(self) -> str:
        return f"Searcher({self.index!r}, exact={self.exact})"

    def reload(self, verify: bool = True) -> bool:
        """Moves to the newest version of the index (after `Indexer.add` / `delete` / `compact`); until then a
        Searcher answers from the version it opened (updates never change a version's files; those a
        compaction retires are removed one version later, so read passage texts before then). verify: check the
        new version's checksums (reads every file once). Returns whether there was a newer version."""
        latest = Index.open(self.index.path, verify=verify and not placement.multi_process(), mmap=self.mmap)
        latest = placement.open_lazily(latest) if placement.multi_process() else latest
        if latest.metadata.get("version", 0) == self.index.metadata.get("version", 0) and (
            latest.metadata.get("build") == self.index.metadata.get("build")
        ):
            return False
        if latest.dim != self.index.dim:
            raise ValueError(f"{latest.path} now has dim {latest.dim}: open a new Searcher")
        recorded = latest.metadata.get("checkpoint", {}).get("fingerprint")
        if recorded != self.index.metadata.get("checkpoint", {}).get("fingerprint") and not (
            self._allow_other_checkpoint or recorded is None or model_fingerprint(self.model) == recorded
        ):  # rebuilt by another model or settings: this Searcher's queries would not match its passages
            raise ValueError(
                f"{latest.path} was rebuilt by another checkpoint or other settings "
                f"({latest.metadata['checkpoint'].get('path')}): open a new Searcher with that checkpoint"
            )
        self.index = latest
        self._plaid = None
        self._warp_arrays = None
        self._exact_arrays = None
        self._collection = None
        self.mesh = placement.search_mesh(self._devices, latest.num_passages)
        return True

    @property
    def version(self) -> int:
        """The version of the index this Searcher answers from (see `reload`)."""
        return self.index.version

    def passages(self, pids: Sequence[int], collection: str | os.PathLike | None = None) -> list[str]:
        """The texts of passages (by collection pid): from the index itself when it carries them, else from
        `collection` or the collection file the index records (refused if its contents differ)."""
        pids = _pid_array(pids)
        positions = self.index.positions(pids)
        if collection is None and self._collection is None and self.index.has_texts:
            return self.index.texts(positions)
        if self._collection is None or collection is not None:
            self._collection = self._open_collection(collection)
        coll, order = self._collection
        # by pid, not by position: after deletes and adds the index's positions are not the collection's rows
        return coll.texts(order[np.searchsorted(coll.pids, pids, sorter=order)])

    def explain(self, query: str, pid: int) -> list:
        """Why passage `pid` scores as it does for `query`: for each query token, the passage token it
        matched best (MaxSim), `[(query_token, doc_token, doc_position, score), ...]` (`explain.Match`),
        the scores summing to the passage's score. See `colbert_jax.search.explain`."""
        placement.require_single_process("explain")
        return explain.explain(self, query, pid)

    def _open_collection(self, collection: str | os.PathLike | None) -> tuple[Any, np.ndarray]:
        """The collection file the index was built from (or `collection`), refused if its contents differ or it
        lacks one of the index's passages, and the order that sorts its pids."""
        from colbert_jax.indexing.collection import Collection

        recorded = self.index.metadata.get("collection", {})
        source = collection or recorded.get("source") or self.config.collection
        if not source or source == "<list of texts>":
            raise needs_option(
                FileNotFoundError,
                f"{self.index.path} was built from a list of texts and records no collection file for passage texts",
                argument="collection=FILE",
                flag="--collection FILE",
                purpose="give one",
            )
        if not Path(source).is_file():
            raise needs_option(
                FileNotFoundError,
                f"the collection file {str(source)!r} that {self.index.path} records is not available from "
                f"{Path.cwd()}",
                argument="collection=FILE",
                flag="--collection FILE",
                purpose="give its path",
            )
        coll = Collection.load(source)
        if recorded.get("fingerprint") and coll.fingerprint != recorded["fingerprint"]:
            raise ValueError(
                f"{source} is not the collection {self.index.path} was built from: its contents differ (sha256 "
                f"{coll.fingerprint[:12]}..., the index records {recorded['fingerprint'][:12]}...)"
            )
        order = np.argsort(coll.pids, kind="stable")
        where = np.minimum(np.searchsorted(coll.pids, self.index.pids, sorter=order), len(order) - 1)
        missing = coll.pids[order[where]] != self.index.pids if len(order) else np.ones(self.index.num_passages, bool)
        if missing.any():
            raise ValueError(
                f"{source} is not the collection of {self.index.path}: it lacks pid {int(self.index.pids[missing][0])}"
                + (f" and {int(missing.sum()) - 1:,} more of the index's passages" if missing.sum() > 1 else "")
            )
        return coll, order

    # -- device state -------------------------------------------------------------------------------
    @property
    def arrays(self) -> IndexArrays:
        """The index's arrays on the search mesh (placed on first use)."""
        return self._plaid_engine().arrays

    def _plaid_engine(self) -> plaid.PlaidEngine:
        """The PLAID engine over this index, its arrays placed on first use."""
        if self._plaid is None:
            self._plaid = plaid.PlaidEngine(
                self.index,
                self.mesh,
                implementation=self.implementation,
                # "auto" lets each kernel fall back to its jnp twin (logged) if it does not compile on this
                # device; an explicit "pallas" raises instead.
                kernels="auto" if self._auto else "pallas",
                on_cpu=self._cpu,
                clamp=self.clamp_maxsim,
                mmap=self.mmap,
            )
        return self._plaid

    def _warp_index(self) -> warp.WarpArrays:
        """The WARP engine's cluster-major arrays, built on first use."""
        if self._warp_arrays is None:
            self._warp_arrays = warp.build_arrays(self.index, self.mesh)
        return self._warp_arrays

    # -- queries ------------------------------------------------------------------------------------
    def encode(self, queries: Sequence[str | np.ndarray]) -> np.ndarray:
        """Queries (texts or pre-encoded [query_maxlen, dim] arrays) -> float32 [n, query_maxlen, dim]."""
        self._validate(queries)
        return self._encode(queries)

    def _validate(self, queries: Sequence[str | np.ndarray]) -> None:
        """Raises `QueryError` for an empty, too long or malformed query, before any search work."""
        lq, dim = self.config.query_maxlen, self.config.dim
        texts, text_rows = [], []
        for i, q in enumerate(queries):
            if isinstance(q, str):
                if not q.strip():
                    raise QueryError(f"query {i} is empty")
                texts.append(q)
                text_rows.append(i)
            elif isinstance(q, np.ndarray | jax.Array):
                if q.ndim != 2 or q.shape[1] != dim:
                    raise QueryError(f"query {i}: a pre-encoded query must be [query_maxlen, {dim}], got {q.shape}")
                if q.shape[0] > lq:
                    raise QueryError(f"query {i} has {q.shape[0]} vectors, longer than query_maxlen={lq}")
            else:
                raise QueryError(f"query {i} must be a str or an array, got {type(q).__name__}")
        if not texts:
            return
        counts = self.model.query_tokenizer.token_counts(texts)
        blank = [row for row, n in zip(text_rows, counts) if n == 0]
        if blank:  # control characters, say: the tokenizer drops them all, and it would search the markers alone
            raise QueryError(f"query {blank[0]} has no tokens ({queries[blank[0]][:40]!r}): nothing to search for")
        long = [(row, int(n)) for row, n in zip(text_rows, counts) if n > lq - 3]
        if long and not self.truncate:
            row, n = long[0]
            raise needs_option(
                QueryError,
                f"query {row} has {n} tokens; query_maxlen={lq} allows {lq - 3}",
                argument="truncate=True",
                flag="--truncate",
                purpose="cut it, as colbert-ai does",
            )
        if long:
            warnings.warn(
                f"{len(long)} of {len(texts)} queries are longer than query_maxlen={lq} allows ({lq - 3} tokens) "
                "and were truncated, as colbert-ai does (truncate=False refuses them)",
                QueryTruncatedWarning,
                stacklevel=3,
            )

    def _encode(self, queries: Sequence[str | np.ndarray]) -> np.ndarray:
        lq, dim = self.config.query_maxlen, self.config.dim
        out = np.zeros((len(queries), lq, dim), np.float32)
        text_rows = [i for i, q in enumerate(queries) if isinstance(q, str)]
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                q = np.asarray(q, np.float32)
                out[i, : q.shape[0]] = q
        if text_rows:
            if jax.process_index() == 0:  # over several processes, process 0's queries are searched
                out[text_rows] = self.model.encode_queries([queries[i] for i in text_rows])
        return placement.broadcast_queries(out)

    # -- search -------------------------------------------------------------------------------------
    def search(self, query: str | np.ndarray, k: int = 10, **kwargs) -> list[tuple[int, int, float]]:
        """Top-k passages for one query: `[(pid, rank, score), ...]`, best first (ranks from 1). Takes
        `search_all`'s keyword arguments (`pids=allowed` to search only those passages)."""
        return self.search_all({0: query}, k, **kwargs)[0]

    def search_all(
        self,
        queries: Mapping[Any, str | np.ndarray] | Sequence[str | np.ndarray],
        k: int = 10,
        *,
        exact: bool | None = None,
        ncells: int | None = None,
        centroid_score_threshold: float | None = None,
        ndocs: int | None = None,
        batch_size: int = MAX_BATCH,
        pids: Collection[int] | Mapping[Any, Collection[int]] | None = None,
        where: str | None = None,
    ) -> Ranking:
        """Searches many queries (`{qid: query}` or a list, qids 0..n-1) in batches -> `Ranking`.

        pids: search only these passages: one collection of pids for every query, or `{qid: pids}`. An
        allowed set of at most `ndocs` passages (or any, with `exact=True`) is scored exactly, whole, so k
        results come back whenever it holds k passages (`exact=True`: brute-force MaxSim over it); a larger
        one filters PLAID's candidates as they are generated. A pid not in the index is a KeyError.
        where: search only passages whose metadata fields (JSONL keys beyond id/text/title, stored in the
          index) satisfy it, e.g. "year >= 2020 AND lang = 'en'" (see `Index.select`); combined with `pids`.
        """
        if not isinstance(queries, Mapping):
            if isinstance(queries, str):
                raise QueryError("search_all takes a dict {qid: query} or a list of queries, not a str")
            queries = dict(enumerate(queries))
        if not queries:
            raise QueryError("no queries")
        if not isinstance(k, int | np.integer) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > self.index.num_passages:
            raise ValueError(f"k={k} exceeds the number of passages in the index ({self.index.num_passages})")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        exact = self.exact if exact is None else exact
        overrides = {
            key: v
            for key, v in (("ncells", ncells), ("ndocs", ndocs), ("centroid_score_threshold", centroid_score_threshold))
            if v is not None
        }
        config = self.config.replace(**overrides) if overrides else self.config  # validating a copy costs 0.1 ms
        qids = list(queries)
        items = [queries[q] for q in qids]
        self._validate(items)
        if where is not None:
            matching = self.index.pids[self.index.select(where)]
            if pids is None:
                pids = matching
            elif isinstance(pids, Mapping):
                pids = {q: np.intersect1d(_pid_array(p), matching) for q, p in pids.items()}
            else:
                pids = np.intersect1d(_pid_array(pids), matching)
        if pids is not None:
            placement.require_single_process("filtered search (pids=, where=)")
            return self._search_filtered(queries, k, pids, exact, config, batch_size)
        if exact:
            placement.require_single_process("exact search")
        else:
            _ = self._warp_index() if self.engine == "warp" else self.arrays  # before any worker thread starts

        def run(start: int) -> tuple[np.ndarray, np.ndarray]:
            chunk = self._encode(items[start : start + batch_size])
            padded = _pad_batch(chunk, batch_size)
            if exact:
                pos, sc = self._exact(padded, k)
            elif self.engine == "warp":
                nprobe = config.ncells if config.ncells is not None else warp.default_nprobe(k)
                nbits = self.index.nbits
                pos, sc = warp.rank(
                    padded, self._warp_index(), mesh=self.mesh, nprobe=nprobe, k=k, nbits=nbits, n_real=len(chunk)
                )
            else:
                pos, sc = self._rank_plaid(padded, k, config, n_real=len(chunk))
            return pos[: len(chunk)], sc[: len(chunk)]

        starts = list(range(0, len(items), batch_size))
        results = []
        if self._cpu and len(starts) > 1 and not placement.multi_process():
            if not exact and self.engine == "plaid" and self.implementation == "streamed" and not self.mmap:
                engine = self._plaid_engine()
                if not engine.entries_sized(self._params(k, config), config.query_maxlen):
                    results.append(run(starts.pop(0)))  # sizes the fused program for the batches in flight
            # Batches in flight: one encodes (every core) while the others' retrieval (partly serial: host
            # work, one-core stages) fills the gaps; a third keeps the cores busy where two still leave idle
            # spells (docs/benchmarks.md). (Not over several processes: each must run the shared programs
            # in the same order.)
            with ThreadPoolExecutor(_BATCHES_IN_FLIGHT) as pool:
                results += pool.map(run, starts)
        else:
            results = [run(start) for start in starts]
        positions = np.concatenate([p for p, _ in results])
        scores = np.concatenate([sc for _, sc in results])
        data = {qid: self._hits(pos, sc) for qid, pos, sc in zip(qids, positions, scores)}
        return Ranking(data, self._provenance(k, exact, config))

    def _hits(self, positions: np.ndarray, scores: np.ndarray) -> list[tuple[int, int, float]]:
        """One query's (positions, scores), best first -> `[(pid, rank, score), ...]` (the empty slots dropped)."""
        ok = np.isfinite(scores) & (positions >= 0) & (positions < self.index.num_passages)
        pids = self.index.pids[positions[ok]]
        return [(int(p), r, float(x)) for r, (p, x) in enumerate(zip(pids, scores[ok]), 1)]

    def _provenance(self, k: int, exact: bool, config: ColBERTConfig, **extra) -> dict:
        """A `Ranking`'s provenance: this search's source, index, k and parameters."""
        return {
            "source": "colbert_jax.Searcher.search_all",
            "index": str(self.index.path),
            "k": k,
            "exact": exact,
            **extra,
            "params": dict(zip(("ncells", "centroid_score_threshold", "ndocs"), search_params(k, config))),
        }

    # -- filtered search ----------------------------------------------------------------------------
    def _search_filtered(self, queries: Mapping, k: int, pids, exact: bool, config, batch_size: int) -> Ranking:
        """Groups queries by allowed set; each group is scored exactly (small sets, exact=True) or by PLAID with
        the set as a candidate filter."""
        qids = list(queries)
        if isinstance(pids, Mapping):
            missing = [q for q in qids if q not in pids]
            if missing:
                raise KeyError(f"pids has no allowed set for query {missing[0]!r}")
            per_query = {q: pids[q] for q in qids}
        else:
            per_query = dict.fromkeys(qids, pids)
        groups: dict[bytes, tuple[np.ndarray, list]] = {}
        resolved: dict[int, np.ndarray] = {}
        for q in qids:
            allowed = per_query[q]
            key = id(allowed)
            if key not in resolved:
                resolved[key] = np.unique(self.index.positions(_pid_array(allowed)))
            positions = resolved[key]
            groups.setdefault(positions.tobytes(), (positions, []))[1].append(q)
        ndocs = search_params(k, config)[2]
        data = {}
        for positions, members in groups.values():
            if len(positions) == 0:
                data.update({q: [] for q in members})
                continue
            items = [queries[q] for q in members]
            if exact or len(positions) <= ndocs:
                pos, sc = self._score_positions(self._encode(items), positions, k)
            else:
                mask = self._plaid_engine().allowed_mask(positions)
                parts = []
                for start in range(0, len(items), batch_size):
                    chunk = self._encode(items[start : start + batch_size])
                    padded = _pad_batch(chunk, batch_size)
                    p, s = self._rank_plaid(padded, min(k, len(positions)), config, n_real=len(chunk), allowed=mask)
                    parts.append((p[: len(chunk)], s[: len(chunk)]))
                pos = np.concatenate([p for p, _ in parts])
                sc = np.concatenate([s for _, s in parts])
            data.update({q: self._hits(p, s) for q, p, s in zip(members, pos, sc)})
        return Ranking({q: data[q] for q in qids}, self._provenance(k, exact, config, filtered=True))

    # -- reranking ----------------------------------------------------------------------------------
    def rerank(
        self, query: str | np.ndarray, pids: Sequence[int], k: int | None = None
    ) -> list[tuple[int, int, float]]:
        """Scores the passages `pids` exactly (MaxSim with the index's decompressed embeddings) ->
        `[(pid, rank, score), ...]`, best first, the best `k` (None: all); ties keep the given order, a
        repeated pid counts once, a pid not in the index is a KeyError naming it."""
        return self.rerank_all({0: query}, {0: pids}, k)[0]

    def rerank_all(
        self, queries: Mapping[Any, str | np.ndarray], candidates: Mapping[Any, Sequence[int]], k: int | None = None
    ) -> Ranking:
        """`rerank` for many queries: `{qid: query}` and `{qid: [pid, ...]}` -> `Ranking`."""
        if k is not None and (not isinstance(k, int | np.integer) or k <= 0):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        placement.require_single_process("rerank")
        qids = list(queries)
        missing = [q for q in qids if q not in candidates]
        if missing:
            raise KeyError(f"no candidates for query {missing[0]!r}")
        items = [queries[q] for q in qids]
        self._validate(items)
        Q = self._encode(items)
        data = {}
        for i, qid in enumerate(qids):
            pids = _pid_array(candidates[qid], f"candidates of query {qid!r}")
            _, first = np.unique(pids, return_index=True)
            pids = pids[np.sort(first)]
            if len(pids) == 0:
                data[qid] = []
                continue
            pos, sc = self._score_positions(Q[i : i + 1], self.index.positions(pids), k or len(pids))
            data[qid] = [(int(p), r, float(x)) for r, (p, x) in enumerate(zip(self.index.pids[pos[0]], sc[0]), 1)]
        return Ranking(data, {"source": "colbert_jax.Searcher.rerank_all", "index": str(self.index.path), "k": k})

    def _score_positions(self, Q: np.ndarray, positions: np.ndarray, k: int, block: int = 4096):
        """Exact MaxSim of every passage at `positions` with the index's decompressed embeddings:
        Q [B, Lq, dim] -> (positions [B, min(k, n)], scores), best first, ties in the order given."""
        ix = self.index
        best_pos = np.zeros((len(Q), 0), np.int64)
        best_sc = np.zeros((len(Q), 0), np.float32)
        for lo in range(0, len(positions), block):
            part = positions[lo : lo + block]
            lens = ix.doclens[part].astype(np.int64)
            starts = ix.offsets[part]
            rows = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
            emb = ix.codec.decompress(ix.codes[rows], ix.residuals[rows])
            bounds = np.concatenate([[0], np.cumsum(lens)[:-1]])
            sim = np.einsum("td,bqd->btq", emb, Q)  # [B, T, Lq]
            per_token = np.maximum.reduceat(sim, bounds, axis=1)  # [B, n, Lq]
            if self.clamp_maxsim:
                per_token = np.maximum(per_token, 0.0)
            scores = per_token.sum(-1, dtype=np.float32)
            best_pos = np.concatenate([best_pos, np.broadcast_to(part, scores.shape)], axis=1)
            best_sc = np.concatenate([best_sc, scores], axis=1)
            order = np.argsort(-best_sc, axis=1, kind="stable")[:, :k]
            best_pos = np.take_along_axis(best_pos, order, 1)
            best_sc = np.take_along_axis(best_sc, order, 1)
        return best_pos, best_sc

    @staticmethod
    def _params(k: int, config: ColBERTConfig) -> plaid.Params:
        ncells, threshold, ndocs = search_params(k, config)
        return plaid.Params(k=k, ncells=ncells, threshold=threshold, ndocs=ndocs)

    def _rank_plaid(self, Q: np.ndarray, k: int, config: ColBERTConfig, n_real: int | None = None, allowed=None):
        """PLAID over a padded batch (rows past `n_real`: padding) -> (positions, scores) on the host.
        `allowed`: a device filter mask (`PlaidEngine.allowed_mask`), applied when candidates are generated."""
        real = np.arange(len(Q)) < (len(Q) if n_real is None else n_real)
        return self._plaid_engine().rank(Q, self._params(k, config), config.query_maxlen, real, allowed)

    def warm_up(self, queries: Sequence[str], k: int = 10, *, max_batch: int = MAX_BATCH) -> float:
        """Compiles ahead what searching at k in batches of up to `max_batch` queries like these needs, so
        that no later call waits for JIT compilation (a server's first requests, a benchmark). Programs are
        also cached on disk: a later process loads them in about a second. Returns the seconds spent.

        Every batch bucket up to `max_batch` is compiled (powers of two, then multiples of 16); on the CPU
        path, also every IVF-entry bucket from the smallest to twice the largest these queries need, for every
        batch size."""
        t0 = time.perf_counter()
        queries = list(queries)
        if not queries:
            raise QueryError("warm_up needs at least one query")
        sizes = batch_buckets(max(1, max_batch), QUERY_BATCH_STEP)
        for size in sizes:
            self.search_all([queries[i % len(queries)] for i in range(size)], k=k, batch_size=max_batch)
        if self.implementation != "streamed" or self.engine == "warp":  # no PLAID programs to compile
            return time.perf_counter() - t0
        engine, params, lq = self._plaid_engine(), self._params(k, self.config), self.config.query_maxlen
        buckets = engine.entry_buckets([self.encode(queries[:max_batch])], params, lq)
        for size in sizes:
            engine.compile_streamed(size, params, lq, buckets)
        return time.perf_counter() - t0

    def _exact(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.mmap:  # in blocks of passages: never the whole index in memory
            return self._score_positions(Q, np.arange(self.index.num_passages), k)
        if self._exact_arrays is None:
            ix = self.index
            embeddings = ix.codec.decompress(ix.codes, ix.residuals)
            passage_of = np.repeat(np.arange(ix.num_passages, dtype=np.int32), ix.doclens)
            self._exact_arrays = (jnp.asarray(embeddings), jnp.asarray(passage_of))
        embeddings, passage_of = self._exact_arrays
        pos, scores = exact_search(Q, embeddings, passage_of, num_passages=self.index.num_passages, k=k)
        return jax.device_get((pos, scores))
