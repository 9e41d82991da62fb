"""`Indexer`: collection -> PLAID index, resumable and atomic.

Stages (colbert-ai 0.2.22 `collection_indexer.py`, with two deliberate differences noted):
1. plan: sample passages (`kmeans.sample_passages`), encode them once, in pieces saved as they finish (an
   interrupt loses at most one piece), estimate the embedding count and choose `num_partitions`. The
   sample's embeddings are kept (float16) and reused when their chunk is indexed: colbert-ai encodes them
   twice; for collections up to ~30k passages that is everything.
2. codec: k-means on the sample minus a held-out split, residual buckets from the held-out part.
3. chunks of `chunksize` passages: encode (length-sorted batches, data-parallel over local devices),
   round to float16, compress. Each finished chunk is saved with a marker written last.
4. finalize: concatenate chunks into TensorStore arrays, build the IVF, write `metadata.json`.

Everything is built in `<parent>/.<name>.partial/` and renamed into place at the end, so an existing
index is never damaged and an interrupted build resumes at its first unfinished chunk (when the
collection, checkpoint and settings are unchanged; otherwise it starts over).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from colbert_jax import distributed, io
from colbert_jax.checkpoint import load_checkpoint
from colbert_jax.config import ColBERTConfig
from colbert_jax.errors import needs_option
from colbert_jax.index import (
    FORMAT_VERSION,
    Index,
    create_embedding_arrays,
    file_checksum,
    finish_index,
    is_index_dir,
    write_texts,
)
from colbert_jax.indexing import kmeans, update
from colbert_jax.indexing.codec import ResidualCodec
from colbert_jax.indexing.collection import Collection
from colbert_jax.indexing.encode import encode_passages
from colbert_jax.indexing.fields import write_fields
from colbert_jax.model import ColBERTModel
from colbert_jax.runtime import enable_compilation_cache

__all__ = ["Indexer", "model_fingerprint"]

CHUNKSIZE = 25_000
SAMPLE_PIECE = 4_096  # passages of the k-means sample encoded between two saves
TEXT_BLOCK = 10_000  # passages read from the collection file at a time when storing their texts
BARRIER_TIMEOUT_S = 7 * 24 * 3600.0  # processes wait for each other's share of the work, however long
WORK_ENTRIES = (
    "plan.json",
    "chunks",
    "sample",
    "sample_embs.npy",
    "sample_doclens.npy",
    "sample_positions.npy",
    "codec.npz",
    "index",
    "texts.bin",
)


def model_fingerprint(model: ColBERTModel) -> str:
    """sha256 of everything that determines the embeddings: weights, backbone and ColBERT settings."""
    cached = getattr(model, "_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(model.params))
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(leaf, np.float32).tobytes())
    c = model.config
    settings = [
        c.dim,
        c.doc_maxlen,
        c.query_maxlen,
        c.mask_punctuation,
        c.attend_to_mask_tokens,
        c.query_token_id,
        c.doc_token_id,
        json.dumps(model.bert_config.to_hf_dict(), sort_keys=True),
    ]
    h.update(json.dumps(settings).encode())
    model._fingerprint = h.hexdigest()
    return model._fingerprint


class Indexer:
    """Builds PLAID indexes with one checkpoint.

    Args:
      checkpoint_or_model: checkpoint directory, Hub id, or a loaded `ColBERTModel`; None (for `add`,
        `delete`, `compact`) uses the checkpoint the index records, loaded when first needed.
      config: a `ColBERTConfig` whose explicitly set fields override the checkpoint's settings.
      centroids: use these centroids instead of k-means (float [P, dim] array, a `.npy`/colbert-ai
        `centroids.pt` file, or a colbert-ai or colbert-jax index directory).
      codec: use this whole codec (centroids and residual buckets): a `ResidualCodec` or an index
        directory (colbert-ai or colbert-jax); no sampling or k-means then.
      chunksize: passages per resumable chunk.
      show_progress: progress bars on stderr.
      **overrides: config keys, e.g. `nbits=2, kmeans_niters=20`.
    """

    def __init__(
        self,
        checkpoint_or_model=None,
        config: ColBERTConfig | None = None,
        *,
        centroids=None,
        codec=None,
        chunksize: int = CHUNKSIZE,
        show_progress: bool = True,
        **overrides,
    ):
        enable_compilation_cache()
        explicit = config.model_dump(exclude_unset=True) if config is not None else {}
        self._explicit = {**explicit, **overrides}
        if checkpoint_or_model is None:
            model = None
        elif isinstance(checkpoint_or_model, ColBERTModel):
            model = checkpoint_or_model
            if explicit or overrides:
                model = model.replace_config(**{**explicit, **overrides})
        else:
            model = load_checkpoint(checkpoint_or_model, config, **overrides)
        self.model = model
        self.config = model.config if model is not None else None
        if chunksize <= 0:
            raise ValueError(f"chunksize must be positive, got {chunksize}")
        self.chunksize = chunksize
        self.show_progress = show_progress
        self.codec = _load_codec(codec) if codec is not None else None
        self.centroids = _load_centroids(centroids) if centroids is not None else None
        given = self.codec.centroids if self.codec is not None else self.centroids
        if model is None:
            if given is not None:
                raise ValueError("centroids= and codec= need a checkpoint or model")
            self.stats = {}
            return
        if given is not None and given.shape[1] != self.config.dim:
            raise ValueError(f"centroids have dim {given.shape[1]}, the checkpoint's dim is {self.config.dim}")
        if self.codec is not None and self.codec.nbits != self.config.nbits:
            if "nbits" in overrides or "nbits" in explicit:
                raise ValueError(f"nbits={self.config.nbits} conflicts with the given codec's nbits={self.codec.nbits}")
            self.config = self.config.replace(nbits=self.codec.nbits)
        self.stats: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------
    def index(
        self, index_path: str | os.PathLike, collection: str | os.PathLike | Sequence[str], overwrite: bool = False
    ) -> Path:
        """Builds the index of `collection` (TSV/JSONL path or list of texts) at `index_path`.

        An existing colbert-jax index is kept unless `overwrite=True` (then it is replaced only once the new
        one is complete); anything else at `index_path` (a file, a directory with other contents) is
        refused. An interrupted build of the same collection with the same settings resumes.
        """
        global _build_id
        if self.model is None:
            raise ValueError("Indexer() without a checkpoint or model can only add, delete and compact")
        _build_id = next(_BUILDS)
        path = Path(index_path)
        io.check_target(path, overwrite=overwrite, what="colbert-jax index", is_ours=is_index_dir)
        t_start = time.perf_counter()
        coll = Collection.load(collection)
        work = path.parent / f".{path.name}.partial"
        self.stats = {"chunks_encoded": 0, "chunks_reused": 0, "passages_encoded": 0}

        # One build of a path at a time: a second would clear or mix the first's work directory.
        work_lock = work.with_name(work.name + ".lock")
        if _leader():
            path.parent.mkdir(parents=True, exist_ok=True)
        held = io.lock_file(work_lock, wait=False, what=f"a build of {path}") if _leader() else nullcontext()
        with held:
            plan = self._plan(coll, work)
            codec = self._codec(plan, work)
            self._chunks(coll, plan, codec, work)
            self._finalize(coll, plan, codec, work, path, t_start)
            if _leader():
                # The plan first: a kill midway through the deletion must not leave a resumable-looking plan
                # whose chunk files are half gone.
                (work / "plan.json").unlink(missing_ok=True)
                shutil.rmtree(work, ignore_errors=True)
                work_lock.unlink(missing_ok=True)
        _sync("done")
        return path

    # -- updates ------------------------------------------------------------------------------------
    def add(
        self,
        index_path: str | os.PathLike,
        collection: str | os.PathLike | Sequence[str],
        replace: bool = False,
        *,
        drift_tolerance: float = update.DRIFT_TOLERANCE,
        max_added_share: float = update.MAX_ADDED_SHARE,
    ) -> np.ndarray:
        """Adds passages to an index in place, with its codec; returns their pids (int64 [n]).

        `collection` is any form `index()` takes: a list of texts gets pids after the largest the index ever held; a
        TSV/JSONL file keeps its ids, and an id already in the index is an error naming it unless
        `replace=True` (the new passage then takes the old one's place). Only the new passages are encoded
        and written (a segment beside the index's arrays; `compact` folds it in). Their reconstruction cosine
        is reported (log, `self.stats["drift"]`, metadata.json `drift`), with an `IndexDriftWarning` when it
        is more than `drift_tolerance` below the index's own or when passages added since the centroids were
        trained exceed `max_added_share` of the index. Atomic: a crash leaves the old index or the new one.
        """
        return update.add(
            self,
            Path(index_path),
            collection,
            replace=replace,
            drift_tolerance=drift_tolerance,
            max_added_share=max_added_share,
            log=self._log,
        )

    def delete(self, index_path: str | os.PathLike, pids: Sequence[int] | np.ndarray) -> int:
        """Deletes passages (by pid) from an index in place; an unknown pid is a KeyError naming it. Atomic.
        Returns the number deleted."""
        return update.delete(Path(index_path), pids, log=self._log)

    def compact(self, index_path: str | os.PathLike, recluster: bool = False) -> None:
        """Folds an index's adds and deletes into a fresh layout (same codec: search results do not change);
        `recluster=True` retrains the centroids on the current passages (a full rebuild over them). Atomic."""
        update.compact(self, Path(index_path), recluster=recluster, log=self._log)

    def _model_for(self, index: Index) -> ColBERTModel:
        """The model that encodes passages for `index`: the given one or the checkpoint the index records,
        with the index's settings; refused if it is not the model that built the index."""
        settings = {k: v for k, v in index.config.to_dict().items() if k != "checkpoint"}
        if self.model is None:
            checkpoint = index.metadata.get("checkpoint", {}).get("path") or index.config.checkpoint
            if not checkpoint:
                raise needs_option(
                    ValueError,
                    f"{index.path}: the index records no checkpoint",
                    argument="Indexer(checkpoint)",
                    flag="--checkpoint DIR",
                    purpose="give the one that built it",
                )
            model = load_checkpoint(checkpoint)
            model = model.replace_config(**{**settings, "checkpoint": model.config.checkpoint})
            self.model, self.config = model, model.config
        recorded = index.metadata.get("checkpoint", {}).get("fingerprint")
        if recorded and model_fingerprint(self.model) != recorded:
            aligned = self.model.replace_config(**{**settings, "checkpoint": self.model.config.checkpoint})
            if model_fingerprint(aligned) != recorded:
                raise ValueError(
                    f"{index.path} was built by another checkpoint ({index.metadata['checkpoint'].get('path')}) or "
                    "other settings: passages encoded by this one would not be comparable"
                )
            self.model, self.config = aligned, aligned.config
        return self.model

    # -- 1. plan ------------------------------------------------------------------------------------
    def _plan(self, coll: Collection, work: Path) -> dict:
        """The build's plan: a fresh one, or the unfinished build's in `work` if it has the same fingerprint.

        With several processes, process 0 decides and writes; the sample's pieces are shared out."""
        fingerprint = self._build_fingerprint(coll)
        plan_path = work / "plan.json"
        if _leader():
            plan = io.read_json(plan_path) if plan_path.is_file() else None
            if plan is not None and plan.get("fingerprint") == fingerprint:
                pieces = len(list((work / "sample").glob("*.json"))) if not plan.get("complete", True) else 0
                chunks = len(list((work / "chunks").glob("*.json")))
                self._log(
                    f"resuming the build in {work}: {pieces} sample pieces and {chunks} of {plan['num_chunks']} "
                    "chunks already done"
                )
            else:
                if plan is not None:
                    self._log(f"discarding an unfinished build of other data or settings in {work}")
                _clear_work_dir(work)
                n = len(coll)
                plan = {
                    "fingerprint": fingerprint,
                    "num_passages": n,
                    "chunksize": self.chunksize,
                    "num_chunks": -(-n // self.chunksize),
                    "sample": None,
                    "complete": False,
                }
                io.write_json(plan_path, plan)  # first, so a killed sampling resumes with its saved pieces
                (work / "chunks").mkdir(exist_ok=True)
        _sync("plan written")
        plan = io.read_json(plan_path)
        if plan.get("complete", True):
            return plan

        n = plan["num_passages"]
        if self.codec is None:
            t = time.perf_counter()
            positions = kmeans.sample_passages(n)
            num_pieces = self._encode_sample(coll, positions, work / "sample")
            _sync("sample encoded")
            if _leader():
                embs = np.concatenate([np.load(work / "sample" / f"{i}.embs.npy") for i in range(num_pieces)])
                doclens = np.concatenate([np.load(work / "sample" / f"{i}.doclens.npy") for i in range(num_pieces)])
                io.save_npy(work / "sample_embs.npy", embs)
                io.save_npy(work / "sample_doclens.npy", doclens)
                io.save_npy(work / "sample_positions.npy", positions)
                avg_doclen = float(doclens.mean())
                plan["sample"] = {
                    "num_passages": len(positions),
                    "num_embeddings": int(doclens.sum()),
                    "avg_doclen_est": avg_doclen,
                }
                plan["num_embeddings_est"] = n * avg_doclen
                heldout = int(min(0.05 * len(embs), 50_000))
                plan["num_partitions"] = (
                    len(self.centroids)
                    if self.centroids is not None
                    else kmeans.num_partitions(n * avg_doclen, len(embs) - heldout)
                )
            self.stats["sample_seconds"] = time.perf_counter() - t
        else:
            plan["num_partitions"] = self.codec.num_partitions
        if _leader():
            plan["complete"] = True
            io.write_json(plan_path, plan)
            shutil.rmtree(work / "sample", ignore_errors=True)  # merged into sample_*.npy
        _sync("plan complete")
        return io.read_json(plan_path)

    def _encode_sample(self, coll: Collection, positions: np.ndarray, where: Path) -> int:
        """Encodes this process's pieces of the k-means sample (at most `SAMPLE_PIECE` passages each; piece i
        belongs to process i mod N), each saved with its marker last, so an interrupted build loses at most
        one piece a process. Returns the number of pieces."""
        where.mkdir(exist_ok=True)
        piece = min(self.chunksize, SAMPLE_PIECE)
        starts = range(0, len(positions), piece)
        mine = [i for i in range(len(starts)) if _owned(i) and not (where / f"{i}.json").is_file()]
        n = len(coll)
        desc = (
            f"encoding passages (all {n:,} are the k-means sample)"
            if len(positions) == n
            else f"encoding k-means sample ({len(positions):,} of {n:,} passages)"
        )
        todo = sum(len(positions[starts[i] : starts[i] + piece]) for i in mine)
        with tqdm(
            total=len(positions),
            initial=len(positions) - todo,
            unit="passage",
            desc=desc,
            disable=not self._show_bars,
        ) as bar:
            for i in mine:
                prefix = where / str(i)
                e, d = self._encode(coll.texts(positions[starts[i] : starts[i] + piece]), bar)
                io.save_npy(f"{prefix}.embs.npy", e.astype(np.float16))
                io.save_npy(f"{prefix}.doclens.npy", d)
                io.write_json(f"{prefix}.json", {"start": starts[i], "num_passages": len(d)})
        return len(starts)

    def _build_fingerprint(self, coll: Collection) -> str:
        c = self.config
        parts = {
            "format": FORMAT_VERSION,
            "collection": coll.fingerprint,
            "model": model_fingerprint(self.model),
            "nbits": c.nbits,
            "kmeans_niters": c.kmeans_niters,
            "chunksize": self.chunksize,
            "centroids": _array_hash(self.centroids),
            "codec": _codec_hash(self.codec),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    # -- 2. codec -----------------------------------------------------------------------------------
    def _codec(self, plan: dict, work: Path) -> ResidualCodec:
        """The given codec, or one trained on the sample by process 0 and read back from disk by every process
        (so all of them compress with identical centroids)."""
        if self.codec is not None:
            return self.codec
        path = work / "codec.npz"
        if _leader() and not path.is_file():
            self._train_codec(plan, work, path)
        _sync("codec written")
        with np.load(path) as z:
            return ResidualCodec(z["centroids"], z["cutoffs"], z["weights"], int(z["nbits"]), float(z["avg_residual"]))

    def _train_codec(self, plan: dict, work: Path, path: Path) -> None:
        t = time.perf_counter()
        sample = np.load(work / "sample_embs.npy").astype(np.float32)
        train, heldout = kmeans.split_heldout(sample, seed=kmeans.SAMPLE_SEED)
        if len(heldout) == 0:  # under 20 sample embeddings: colbert-ai fails here; use the sample itself
            heldout = train
        if self.centroids is not None:
            centroids = self.centroids
        else:
            k = plan["num_partitions"]
            self._log(
                f"k-means: {k:,} centroids from {len(train):,} embeddings, {self.config.kmeans_niters} iterations"
            )
            centroids = kmeans.train_centroids(train, k, self.config.kmeans_niters)
        codec = ResidualCodec.train(centroids, heldout, self.config.nbits)
        with io.atomic_file(path, "wb") as f:
            np.savez(
                f,
                centroids=codec.centroids,
                cutoffs=codec.bucket_cutoffs,
                weights=codec.bucket_weights,
                nbits=codec.nbits,
                avg_residual=codec.avg_residual,
            )
        self.stats["codec_seconds"] = time.perf_counter() - t

    # -- 3. chunks ----------------------------------------------------------------------------------
    def _chunks(self, coll: Collection, plan: dict, codec: ResidualCodec, work: Path) -> None:
        n, cs = plan["num_passages"], plan["chunksize"]
        sample = None
        if plan["sample"] is not None:
            sample = (
                np.load(work / "sample_positions.npy"),
                np.load(work / "sample_doclens.npy"),
                np.load(work / "sample_embs.npy", mmap_mode="r"),
            )
        # chunk i belongs to process i mod N; every other chunk counts as done here
        done = [not _owned(i) or (work / "chunks" / f"{i}.json").is_file() for i in range(plan["num_chunks"])]
        bar = tqdm(
            total=n,
            initial=sum(min(cs, n - i * cs) for i, d in enumerate(done) if d),
            unit="passage",
            desc="compressing" if sample is not None and len(sample[0]) == n else "encoding and compressing",
            disable=not self._show_bars,
            smoothing=0.1,
        )
        t = time.perf_counter()
        for i in range(plan["num_chunks"]):
            if done[i]:
                self.stats["chunks_reused"] += _owned(i)
                continue
            start, stop = i * cs, min(n, (i + 1) * cs)
            embs, doclens = self._chunk_embeddings(coll, start, stop, sample, bar)
            codes, residuals = codec.compress(embs)
            prefix = work / "chunks" / str(i)
            io.save_npy(f"{prefix}.codes.npy", codes)
            io.save_npy(f"{prefix}.residuals.npy", residuals)
            io.save_npy(f"{prefix}.doclens.npy", doclens.astype(np.int32))
            io.write_json(
                f"{prefix}.json", {"start": start, "num_passages": stop - start, "num_embeddings": int(doclens.sum())}
            )
            self.stats["chunks_encoded"] += 1
        bar.close()
        self.stats["chunks_seconds"] = time.perf_counter() - t
        _sync("chunks written")

    def _chunk_embeddings(self, coll: Collection, start: int, stop: int, sample, bar) -> tuple[np.ndarray, np.ndarray]:
        """float16 [sum(doclens), dim] embeddings and doclens of passages start..stop-1, in order."""
        count = stop - start
        per_passage: list[np.ndarray | None] = [None] * count
        todo = np.arange(start, stop)
        if sample is not None:
            positions, doclens, embs = sample
            lo, hi = np.searchsorted(positions, [start, stop])
            offsets = np.concatenate([[0], np.cumsum(doclens)])
            for j in range(lo, hi):
                per_passage[positions[j] - start] = np.asarray(embs[offsets[j] : offsets[j + 1]])
            todo = np.setdiff1d(todo, positions[lo:hi], assume_unique=True)
            bar.update(hi - lo)
        if len(todo):
            for row, e in zip(todo, encode_passages(self.model, coll.texts(todo), bar.update)):
                per_passage[row - start] = e.astype(np.float16)
            self.stats["passages_encoded"] += len(todo)
        doclens = np.array([len(x) for x in per_passage], np.int64)
        return np.concatenate(per_passage), doclens

    def _encode(self, texts: list[str], bar) -> tuple[np.ndarray, np.ndarray]:
        """Flattened float32 embeddings and doclens of `texts`, in order, advancing `bar`."""
        per_passage = encode_passages(self.model, texts, bar.update)
        self.stats["passages_encoded"] += len(texts)
        return np.concatenate(per_passage), np.array([len(x) for x in per_passage], np.int64)

    # -- 4. finalize --------------------------------------------------------------------------------
    def _finalize(
        self, coll: Collection, plan: dict, codec: ResidualCodec, work: Path, path: Path, t_start: float
    ) -> None:
        """Writes the index from the saved chunks: the codes and residuals arrays are written storage chunk by
        storage chunk, shared out between the processes (no two write the same file); process 0 then writes
        the small arrays, the IVF and metadata.json, and moves the index into place."""
        num_chunks = plan["num_chunks"]
        chunk_meta = [io.read_json(work / "chunks" / f"{i}.json") for i in range(num_chunks)]
        starts = np.concatenate([[0], np.cumsum([c["num_embeddings"] for c in chunk_meta])])
        total = int(starts[-1])
        out = work / "index"
        t = time.perf_counter()
        if _leader():
            create_embedding_arrays(out, total, codec.packed_dim)
        _sync("index arrays created")

        def rows(kind: str, lo: int, hi: int) -> np.ndarray:
            """Rows lo..hi-1 of the concatenated chunks' `kind` (codes or residuals)."""
            parts = []
            for i in range(np.searchsorted(starts, lo, side="right") - 1, num_chunks):
                if starts[i] >= hi:
                    break
                a = np.load(work / "chunks" / f"{i}.{kind}.npy", mmap_mode="r")
                parts.append(a[max(lo - starts[i], 0) : min(hi, starts[i + 1]) - starts[i]])
            return np.concatenate(parts) if parts else np.zeros((0,), np.int32)

        stores = {kind: io.open_array(out / kind) for kind in ("codes", "residuals")}
        pieces = [
            (kind, lo, min(lo + io.chunk_rows(store), total))
            for kind, store in stores.items()
            for lo in range(0, total, io.chunk_rows(store))
        ]
        for j, (kind, lo, hi) in enumerate(pieces):
            if _owned(j):
                io.write_rows(stores[kind], lo, rows(kind, lo, hi))
        _sync("index rows written")

        if _leader():
            doclens = np.concatenate([np.load(work / "chunks" / f"{i}.doclens.npy") for i in range(num_chunks)])
            n = len(coll)
            texts = (t for start in range(0, n, TEXT_BLOCK) for t in coll.text_range(start, start + TEXT_BLOCK))
            write_texts(out, texts, n, work / "texts.bin")
            fields = None
            if coll.may_have_fields:
                blocks = (range(s, min(n, s + TEXT_BLOCK)) for s in range(0, n, TEXT_BLOCK))
                records = ((i, int(coll.pids[i]), f) for b in blocks for i, f in zip(b, coll.fields(b)))
                columns = write_fields(out / "fields.sqlite", records)
                if columns:
                    digest = file_checksum(out / "fields.sqlite")
                    fields = {"path": "fields.sqlite", "sha256": digest, "columns": columns}
            coll.check_unchanged()  # the texts and fields just read back are the ones encoded
            self.stats["total_seconds"] = time.perf_counter() - t_start  # finalize time added below
            finish_index(
                out,
                config=self.config,
                codec=codec,
                codes=rows("codes", 0, total),
                doclens=doclens,
                pids=coll.pids,
                checkpoint={"path": self.config.checkpoint, "fingerprint": model_fingerprint(self.model)},
                collection={"source": coll.location, "fingerprint": coll.fingerprint},
                build={
                    "plan": plan,
                    "stats": self.stats,
                    "devices": self.model.n_devices,
                    "processes": jax.process_count(),
                    "backend": jax.default_backend(),
                },
                texts=True,
                fields=fields,
            )
            self.stats["finalize_seconds"] = time.perf_counter() - t
            self.stats["total_seconds"] = time.perf_counter() - t_start
            # An index already there may have a writer (add, delete, compact) in flight: swap only under its lock.
            with io.locked_dir(path) if path.is_dir() else nullcontext():
                io.replace_dir(out, path)
            self._log(
                f"index written: {path} ({len(coll):,} passages, {total:,} embeddings, "
                f"{codec.num_partitions:,} partitions, {self.stats['total_seconds']:.1f}s)"
            )
        _sync("index in place")

    @property
    def _show_bars(self) -> bool:
        return self.show_progress and _leader()

    def _log(self, message: str) -> None:
        if self._show_bars:
            tqdm.write(f"[colbert-jax] {message}")


def _leader() -> bool:
    return jax.process_index() == 0


def _owned(item: int) -> bool:
    """Whether this process does work item `item` (items are dealt out round-robin between processes)."""
    return item % jax.process_count() == jax.process_index()


_BUILDS = itertools.count()  # barrier names must be unique per runtime: one series per index() call
_build_id = 0


def _sync(name: str) -> None:
    """Waits until every process gets here (a no-op for one process). Through the coordinator, not a device
    collective: a process may wait here for hours while another trains centroids or encodes a larger share."""
    if jax.process_count() > 1:
        distributed.barrier(f"colbert-jax index {_build_id}: {name}", timeout_s=BARRIER_TIMEOUT_S)


def _clear_work_dir(work: Path) -> None:
    """Empties `work` (a build's `.NAME.partial`), refusing if it holds anything a build does not write."""
    if work.exists():
        foreign = [p.name for p in work.iterdir() if p.name not in WORK_ENTRIES and not p.name.startswith(".")]
        if foreign or not work.is_dir() or work.is_symlink():
            raise FileExistsError(
                f"{work} is where the build works, but it holds things a build does not write "
                f"({', '.join(sorted(foreign)[:3]) or 'it is not a directory'}): move them away"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)


# -- inputs for centroids / codec -----------------------------------------------------------------
def _load_centroids(source) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return _normalized(source)
    path = Path(source)
    if path.is_dir():
        if is_index_dir(path):  # ours (its centroids may live in a generation after a compaction)
            return Index.open(path, verify=False).codec.centroids
        path = path / "centroids.pt"
    if not path.is_file():
        raise FileNotFoundError(f"centroids not found: {path}")
    if path.suffix == ".npy":
        return _normalized(np.load(path))
    from colbert_jax.torch_io import load_torch_file

    return _normalized(load_torch_file(path))


def _normalized(c) -> np.ndarray:
    c = np.asarray(c, np.float32)
    if c.ndim != 2:
        raise ValueError(f"centroids must be a 2-D array [P, dim], got shape {c.shape}")
    return c


def _load_codec(source) -> ResidualCodec:
    if isinstance(source, ResidualCodec):
        return source
    path = Path(source)
    if is_index_dir(path):
        return Index.open(path, verify=False).codec
    from colbert_jax.interop import read_colbert_codec

    return read_colbert_codec(path)


def _array_hash(a: np.ndarray | None) -> str | None:
    return None if a is None else hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def _codec_hash(codec: ResidualCodec | None) -> str | None:
    if codec is None:
        return None
    parts = [codec.centroids, codec.bucket_cutoffs, codec.bucket_weights]
    return hashlib.sha256(
        b"".join(np.ascontiguousarray(p, np.float32).tobytes() for p in parts) + bytes([codec.nbits])
    ).hexdigest()
