"""A PLAID index on disk: TensorStore (zarr v3) arrays plus `metadata.json`, and `Index.open` to read it.

Layout of an index directory (positions 0..N-1 are passages in collection order; `pids` maps them to the
collection's own ids):

    metadata.json     format, version, config, checkpoint fingerprint, counts, per-array sha256
    centroids/        float16 [P, dim]      L2-normalised k-means centroids
    bucket_cutoffs/   float32 [2^nbits - 1] residual quantisation cutoffs
    bucket_weights/   float32 [2^nbits]     residual reconstruction values
    codes/            int32   [E]           centroid of each embedding (passage order, token order)
    residuals/        uint8   [E, dim*nbits/8]  packed residual bucket indices
    doclens/          int32   [N]           embeddings per passage
    pids/             int64   [N]           the collection's id of each passage
    ivf/              int32   [sum(ivf_lengths)]  passage positions per centroid, sorted, unique
    ivf_lengths/      int32   [P]
    texts/            uint8   [bytes]       (optional) the passages' UTF-8 texts, one after another
    text_offsets/     int64   [N + 1]       (optional) where each passage's text starts in `texts`

`metadata.json` is written last, so a directory without it is not an index.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from colbert_jax import io
from colbert_jax.config import ColBERTConfig, ConfigError
from colbert_jax.indexing.codec import ResidualCodec
from colbert_jax.indexing.ivf import build_ivf, embedding_offsets

__all__ = [
    "Index",
    "CorruptIndexError",
    "write_index",
    "create_embedding_arrays",
    "finish_index",
    "write_texts",
    "is_index_dir",
    "FORMAT",
    "FORMAT_VERSION",
    "ARRAYS",
]

FORMAT = "colbert-jax-index"
FORMAT_VERSION = 1
ARRAYS = (
    "centroids",
    "bucket_cutoffs",
    "bucket_weights",
    "codes",
    "residuals",
    "doclens",
    "pids",
    "ivf",
    "ivf_lengths",
)
OPTIONAL_ARRAYS = ("texts", "text_offsets")  # an index built from a collection carries its passages


class CorruptIndexError(ValueError):
    """An index directory is incomplete, inconsistent or has been modified."""


def is_index_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory that colbert-jax wrote as an index (its metadata.json says so)."""
    try:
        return json.loads((Path(path) / "metadata.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class Index:
    """An opened, validated index. Arrays are read on first use and kept in memory."""

    def __init__(self, path: Path, metadata: dict[str, Any]):
        self.path = path
        self.metadata = metadata
        self.config = ColBERTConfig.from_dict(metadata["config"], source=f"{path}/metadata.json")

    def __repr__(self) -> str:
        return (
            f"Index({str(self.path)!r}, passages={self.num_passages}, embeddings={self.num_embeddings}, "
            f"partitions={self.num_partitions}, nbits={self.nbits})"
        )

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> Index:
        """Opens and validates an index; raises `CorruptIndexError` naming the missing or bad part.

        verify=True also checks every array's sha256 against `metadata.json` (reads all files once).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"index directory not found: {path}")
        meta_path = path / "metadata.json"
        if not meta_path.is_file():
            partial = path.parent / f".{path.name}.partial"
            hint = " (an unfinished build is in progress or was interrupted)" if partial.exists() else ""
            raise CorruptIndexError(f"{path}: missing metadata.json: not a finished colbert-jax index{hint}")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CorruptIndexError(f"{meta_path}: not valid JSON: {e}") from None
        if metadata.get("format") != FORMAT:
            raise CorruptIndexError(
                f"{path}: not a colbert-jax index (format {metadata.get('format')!r}); "
                "use colbert_jax.import_colbert_index for colbert-ai indexes"
            )
        if metadata.get("format_version") != FORMAT_VERSION:
            raise CorruptIndexError(
                f"{path}: index format version {metadata.get('format_version')} is not "
                f"supported (this colbert-jax reads version {FORMAT_VERSION})"
            )
        try:
            index = cls(path, metadata)
        except (ConfigError, KeyError) as e:
            raise CorruptIndexError(f"{meta_path}: bad config: {e}") from None
        index._validate(verify)
        return index

    def _validate(self, verify: bool) -> None:
        listed = self.metadata.get("arrays", {})
        for name in ARRAYS + tuple(n for n in OPTIONAL_ARRAYS if n in listed):
            entry, where = listed.get(name), self.path / name
            if entry is None:
                raise CorruptIndexError(f"{self.path}: metadata.json does not list array '{name}'")
            if not (where / "zarr.json").is_file():
                raise CorruptIndexError(f"{self.path}: array '{name}' is missing")
            try:
                store = io.open_array(where)
            except Exception as e:  # noqa: BLE001 - TensorStore raises ValueError/RuntimeError variants
                raise CorruptIndexError(f"{self.path}: array '{name}' is unreadable: {e}") from None
            shape, dtype = list(store.shape), np.dtype(store.dtype.numpy_dtype).name
            if shape != entry["shape"] or dtype != entry["dtype"]:
                raise CorruptIndexError(
                    f"{self.path}: array '{name}' is {dtype}{shape}, metadata.json says "
                    f"{entry['dtype']}{entry['shape']}"
                )
            if verify and io.array_checksum(where) != entry["sha256"]:
                raise CorruptIndexError(
                    f"{self.path}: array '{name}' is corrupt (checksum mismatch: truncated or modified files)"
                )
        m = self.metadata
        n, e, p = m["num_passages"], m["num_embeddings"], m["num_partitions"]
        expect = {
            "doclens": [n],
            "pids": [n],
            "codes": [e],
            "centroids": [p, m["dim"]],
            "ivf_lengths": [p],
            "residuals": [e, m["dim"] * m["nbits"] // 8],
        }
        if self.has_texts:
            expect["text_offsets"] = [n + 1]
        for name, shape in expect.items():
            if listed[name]["shape"] != shape:
                raise CorruptIndexError(
                    f"{self.path}: array '{name}' has shape {listed[name]['shape']}, "
                    f"expected {shape} from the counts in metadata.json"
                )
        if verify:
            try:
                self._check_consistency()
            except Exception as e:  # noqa: BLE001 - any read failure means a damaged array
                if isinstance(e, CorruptIndexError):
                    raise
                raise CorruptIndexError(f"{self.path}: unreadable array data: {e}") from None

    def _check_consistency(self) -> None:
        if int(self.doclens.sum()) != self.num_embeddings:
            raise CorruptIndexError(
                f"{self.path}: doclens sum to {int(self.doclens.sum())}, "
                f"but the index has {self.num_embeddings} embeddings"
            )
        if int(self.ivf_lengths.sum()) != len(self.ivf):
            raise CorruptIndexError(
                f"{self.path}: ivf_lengths sum to {int(self.ivf_lengths.sum())}, ivf has {len(self.ivf)} entries"
            )
        if len(np.unique(self.pids)) != len(self.pids):
            raise CorruptIndexError(f"{self.path}: duplicate pids")

    # -- counts and arrays --------------------------------------------------------------------------
    num_passages = property(lambda self: int(self.metadata["num_passages"]))
    num_embeddings = property(lambda self: int(self.metadata["num_embeddings"]))
    num_partitions = property(lambda self: int(self.metadata["num_partitions"]))
    nbits = property(lambda self: int(self.metadata["nbits"]))
    dim = property(lambda self: int(self.metadata["dim"]))

    def _array(self, name: str) -> np.ndarray:
        return io.read_array(self.path / name)

    codes = functools.cached_property(lambda self: self._array("codes"))
    residuals = functools.cached_property(lambda self: self._array("residuals"))
    doclens = functools.cached_property(lambda self: self._array("doclens"))
    pids = functools.cached_property(lambda self: self._array("pids"))
    ivf = functools.cached_property(lambda self: self._array("ivf"))
    ivf_lengths = functools.cached_property(lambda self: self._array("ivf_lengths"))

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """Embedding offsets per passage position, int64 [N + 1]."""
        return embedding_offsets(self.doclens)

    @functools.cached_property
    def codec(self) -> ResidualCodec:
        return ResidualCodec(
            centroids=self._array("centroids").astype(np.float32),
            bucket_cutoffs=self._array("bucket_cutoffs"),
            bucket_weights=self._array("bucket_weights"),
            nbits=self.nbits,
            avg_residual=float(self.metadata.get("avg_residual", 0.0)),
        )

    @functools.cached_property
    def _position_of(self) -> dict[int, int] | None:
        if np.array_equal(self.pids, np.arange(self.num_passages)):
            return None  # pids are positions
        return {int(p): i for i, p in enumerate(self.pids)}

    def positions(self, pids) -> np.ndarray:
        """Collection pids -> passage positions; a pid not in the index raises KeyError naming it."""
        pids = np.atleast_1d(np.asarray(pids))
        if pids.dtype.kind not in "iu":
            raise TypeError(f"pids must be integers, got {pids.dtype}")
        if self._position_of is None:
            bad = pids[(pids < 0) | (pids >= self.num_passages)]
            if len(bad):
                raise KeyError(f"pid {int(bad[0])} is not in the index")
            return pids.astype(np.int64)
        try:
            return np.array([self._position_of[int(p)] for p in pids], np.int64)
        except KeyError as e:
            raise KeyError(f"pid {e.args[0]} is not in the index") from None

    @property
    def has_texts(self) -> bool:
        """Whether the index carries its passages' texts (indexes built before 0.2, and imported ones, do not)."""
        return all(name in self.metadata.get("arrays", {}) for name in OPTIONAL_ARRAYS)

    @functools.cached_property
    def _text_offsets(self) -> np.ndarray:
        return self._array("text_offsets")

    @functools.cached_property
    def _text_store(self):
        return io.open_array(self.path / "texts")

    def texts(self, positions) -> list[str]:
        """The texts of the passages at `positions` (not pids), read from the index on demand."""
        if not self.has_texts:
            raise FileNotFoundError(f"{self.path} does not carry its passages' texts")
        offsets = self._text_offsets
        reads = [self._text_store[int(offsets[i]) : int(offsets[i + 1])].read() for i in positions]  # concurrent
        return [np.asarray(r.result()).tobytes().decode("utf-8") for r in reads]

    def embeddings(self, pids):
        """Decompressed embeddings of passages: one pid -> float32 [doclen, dim]; a list -> a list of them."""
        single = np.ndim(pids) == 0
        pos = self.positions(pids)
        rows = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in pos]
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        embs = self.codec.decompress(self.codes[flat], self.residuals[flat])
        out = np.split(embs, np.cumsum([len(r) for r in rows])[:-1])
        return out[0] if single else out

    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def create_embedding_arrays(out: Path, num_embeddings: int, packed_dim: int) -> None:
    """Starts an index directory at `out` (replacing anything there) with empty `codes` and `residuals`
    arrays, the parts that grow with the collection; `finish_index` completes it once they are written."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    io.create_array(out / "codes", (num_embeddings,), np.int32)
    io.create_array(out / "residuals", (num_embeddings, packed_dim), np.uint8)


def finish_index(
    out: Path,
    *,
    config: ColBERTConfig,
    codec: ResidualCodec,
    codes: np.ndarray,
    doclens: np.ndarray,
    pids: np.ndarray,
    checkpoint: dict[str, Any],
    collection: dict[str, Any],
    build: dict[str, Any],
    texts: bool = False,
) -> None:
    """Completes an index whose `codes` and `residuals` arrays (and, with `texts=True`, its `texts` and
    `text_offsets`, see `write_texts`) are written (`codes` is their content): writes the codec, doclens, pids
    and IVF arrays, then `metadata.json` last."""
    doclens = np.asarray(doclens, np.int32)
    if len(doclens) != len(pids):
        raise ValueError(f"{len(doclens)} doclens for {len(pids)} pids")
    num_embeddings = len(codes)
    if int(doclens.sum()) != num_embeddings:
        raise ValueError(f"doclens sum to {int(doclens.sum())}, the index has {num_embeddings} embeddings")
    ivf, ivf_lengths = build_ivf(codes, doclens, codec.num_partitions)

    written = ("codes", "residuals") + (OPTIONAL_ARRAYS if texts else ())
    arrays = {name: io.describe_array(out / name) for name in written}
    small = {
        "centroids": codec.centroids.astype(np.float16),
        "bucket_cutoffs": codec.bucket_cutoffs.astype(np.float32),
        "bucket_weights": codec.bucket_weights.astype(np.float32),
        "doclens": doclens,
        "pids": np.asarray(pids, np.int64),
        "ivf": ivf,
        "ivf_lengths": ivf_lengths,
    }
    for name, value in small.items():
        arrays[name] = io.write_array(out / name, value)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.replace(nbits=codec.nbits).to_dict(),
        "checkpoint": checkpoint,
        "collection": collection,
        "num_passages": int(len(pids)),
        "num_embeddings": int(num_embeddings),
        "num_partitions": codec.num_partitions,
        "nbits": codec.nbits,
        "dim": codec.dim,
        "avg_doclen": float(num_embeddings / max(len(pids), 1)),
        "avg_residual": float(codec.avg_residual),
        "arrays": arrays,
        "build": {"created": datetime.datetime.now().astimezone().isoformat(), **build},
    }
    io.write_json(out / "metadata.json", metadata)


def write_texts(out: Path, texts: Iterable[str], count: int, scratch: Path) -> None:
    """Writes the `texts` and `text_offsets` arrays of `count` passages (streamed through the file `scratch`,
    so the collection is never held in memory)."""
    offsets = np.zeros(count + 1, np.int64)
    with open(scratch, "wb") as f:
        for i, text in enumerate(texts):
            data = text.encode("utf-8")
            f.write(data)
            offsets[i + 1] = offsets[i] + len(data)
    total = int(offsets[-1])
    store = io.create_array(out / "texts", (total,), np.uint8)
    if total:
        data = np.memmap(scratch, np.uint8, mode="r")
        step = io.chunk_rows(store)
        for start in range(0, total, step):
            io.write_rows(store, start, data[start : start + step])
        del data
    io.write_array(out / "text_offsets", offsets)
    scratch.unlink(missing_ok=True)


def write_index(
    out: Path,
    *,
    config: ColBERTConfig,
    codec: ResidualCodec,
    chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_embeddings: int,
    pids: np.ndarray,
    checkpoint: dict[str, Any],
    collection: dict[str, Any],
    build: dict[str, Any],
) -> None:
    """Writes an index directory at `out` (replacing anything there) from compressed chunks.

    `chunks` yields `(codes int32 [e], residuals uint8 [e, dim*nbits/8], doclens [n])` in passage order;
    they are streamed into the arrays, so only the codes (4 bytes per embedding) are held at once.
    `metadata.json` is written last.
    """
    create_embedding_arrays(out, num_embeddings, codec.packed_dim)
    codes_store, residuals_store = io.open_array(out / "codes"), io.open_array(out / "residuals")
    all_codes = np.empty(num_embeddings, np.int32)
    doclens, offset = [], 0
    for codes, residuals, lens in chunks:
        if len(codes) != len(residuals) or len(codes) != int(np.sum(lens)):
            raise ValueError(
                f"chunk at embedding {offset}: {len(codes)} codes, {len(residuals)} residuals, "
                f"doclens summing to {int(np.sum(lens))}"
            )
        if offset + len(codes) > num_embeddings:
            raise ValueError(f"chunks hold more than the {num_embeddings} embeddings announced")
        io.write_rows(codes_store, offset, codes.astype(np.int32, copy=False))
        io.write_rows(residuals_store, offset, residuals)
        all_codes[offset : offset + len(codes)] = codes
        doclens.append(np.asarray(lens, np.int32))
        offset += len(codes)
    if offset != num_embeddings:
        raise ValueError(f"chunks hold {offset} embeddings, {num_embeddings} were announced")
    finish_index(
        out,
        config=config,
        codec=codec,
        codes=all_codes,
        doclens=np.concatenate(doclens) if doclens else np.zeros(0, np.int32),
        pids=pids,
        checkpoint=checkpoint,
        collection=collection,
        build=build,
    )
