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

An index changed by `Indexer.add` / `delete` / `compact` (see `colbert_jax.indexing.update`) keeps these
arrays as its base and records its changes in `metadata.json`: `log`, in order, holds each add (a segment,
`segments/<name>/` with its own codes, residuals, doclens, pids, texts and text_offsets arrays) and each
delete (the deleted pids, `updates/<name>.deleted/`); `base` holds the base arrays' counts and the top-level
counts are the live passages'. An array entry may name its directory (`path`, relative to the index); a
compacted index's base lives in `gen-<version>/`. Files are never changed once written: every update writes
new files, then replaces `metadata.json` (one rename), so a reader sees one version or the next.

Passage positions of an updated index are the live passages in this order: the base's in its order, a
replaced passage in the place of the one it replaces, added passages after them in the order added (the
order a Python dict `{pid: text}` keeps under the same changes).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import mmap
import os
import shutil
from collections.abc import Callable, Iterable
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
BULK_TEXTS = 4096  # from this many passages on, `Index.texts` reads each texts array whole


class IndexChangedError(RuntimeError):
    """The index on disk moved on (rebuilt, or compacted twice) since this version was opened, and a lazy read
    (passage texts) of this version's files is no longer possible: open the newest version (`Searcher.reload`)."""


class CorruptIndexError(ValueError):
    """An index directory is incomplete, inconsistent or has been modified."""


def is_index_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory that colbert-jax wrote as an index (its metadata.json says so)."""
    try:
        return json.loads((Path(path) / "metadata.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class ChunkedMemmap:
    """A zarr v3 array stored raw (the `bytes` codec, as colbert-jax writes them), read from its chunk files on
    demand: nothing is held in memory but what an indexing returns.

    Slices are read with `pread` into a new array; integer-array indexing (scattered rows) gathers through
    memory maps of the chunk files and then drops the touched pages from the process's mappings
    (`MADV_DONTNEED`; they stay in the page cache), so repeated gathers do not accumulate the file in the
    process's resident set. Supports `len`, `shape`, `dtype`, `nbytes`, slices and integer-array indexing of
    rows (each returns a numpy array).
    """

    def __init__(self, path: Path):
        meta = json.loads((path / "zarr.json").read_text())
        codecs = meta.get("codecs", [])
        if [c["name"] for c in codecs] != ["bytes"] or codecs[0].get("configuration", {}).get("endian", "little") != (
            "little"
        ):
            raise ValueError(f"{path}: not stored raw (codecs {codecs}): cannot be memory-mapped")
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        separator = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        tail = separator.join(["0"] * (len(self.shape) - 1))
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._files: list[Path | None] = []
        self._maps: list[np.ndarray | None] = []
        for c in range(-(-self.shape[0] // self.rows) if self.shape[0] else 0):
            f = path / f"c{separator}{c}{separator + tail if tail else ''}"
            # a chunk that was never written holds the fill value (0)
            self._files.append(f if f.exists() else None)
            self._maps.append(np.memmap(f, self.dtype, "r", shape=(self.rows, *self.shape[1:])) if f.exists() else None)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def _read(self, c: int, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows lo:hi of chunk c (chunk-relative) into `out`, by pread (no mapped pages)."""
        f = self._files[c]
        if f is None:
            out[...] = 0
            return
        try:
            fh = open(f, "rb", buffering=0)
        except FileNotFoundError:  # read by path: the version that named it is gone (the mappings hold theirs)
            raise IndexChangedError(
                f"{f} was removed by an update since this version was opened (Searcher.reload() moves to the "
                "newest version)"
            ) from None
        with fh:
            fh.seek(lo * self._row_bytes)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise CorruptIndexError(f"{f}: chunk file is shorter than its array says")
                got += n

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
            for c in range(start // self.rows, -(-stop // self.rows)) if stop > start else ():
                lo, hi = max(start, c * self.rows), min(stop, (c + 1) * self.rows)
                self._read(c, lo - c * self.rows, hi - c * self.rows, out[lo - start : hi - start])
            return out
        index = np.asarray(index)
        if index.ndim == 0:
            return self[int(index) : int(index) + 1][0]
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        chunk, within = np.divmod(index.astype(np.int64), self.rows)
        for c in np.unique(chunk):  # a loop over chunk files (tens), not rows
            sel = chunk == c
            m = self._maps[int(c)]
            if m is None:
                out[sel] = 0
                continue
            out[sel] = m[within[sel]]
            # Touched pages of a mapping count in the process's RSS until unmapped: drop them (the page cache
            # keeps them, so a later gather of the same rows does not go to disk).
            m._mmap.madvise(mmap.MADV_DONTNEED)
        return out

    def resident_bytes(self) -> int:
        """Bytes of this array's chunk files now resident in this process's mappings (from /proc/self/smaps)."""
        files = {os.path.realpath(f) for f in self._files if f is not None}
        total, mine = 0, False
        with open("/proc/self/smaps") as fh:
            for line in fh:
                parts = line.split()
                if parts and not parts[0].endswith(":"):  # a mapping's header: address range, perms, ..., path
                    mine = len(parts) >= 6 and parts[5] in files
                elif mine and parts[0] == "Rss:":
                    total += int(parts[1]) << 10
        return total

    def __array__(self, dtype=None, copy=None):
        whole = self[0 : self.shape[0]]
        return whole if dtype is None else whole.astype(dtype)


class Index:
    """An opened, validated index. Arrays are read on first use and kept in memory; with `mmap=True` codes
    and residuals are `ChunkedMemmap`s instead (read from disk as rows are indexed) and the IVF is read each
    time it is asked for (search copies it to the device once)."""

    def __init__(self, path: Path, metadata: dict[str, Any], mmap: bool = False):
        self.path = path
        self.metadata = metadata
        self.mmap = mmap
        self.config = ColBERTConfig.from_dict(metadata["config"], source=f"{path}/metadata.json")
        self._directory = _directory_id(path)  # a rebuild swaps in another directory: lazy reads must notice

    def with_mmap(self) -> Index:
        """This version with its codes and residuals memory-mapped (the same directory, as opened)."""
        other = Index(self.path, self.metadata, mmap=True)
        other._directory = self._directory
        return other

    def __repr__(self) -> str:
        return (
            f"Index({str(self.path)!r}, passages={self.num_passages}, embeddings={self.num_embeddings}, "
            f"partitions={self.num_partitions}, nbits={self.nbits})"
        )

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True, mmap: bool = False) -> Index:
        """Opens and validates an index; raises `CorruptIndexError` naming the missing or bad part.

        verify=True also checks every array's sha256 against `metadata.json`, reading each file once in
        blocks (nothing is kept); verify=False reads only metadata.json and the arrays' headers. mmap=True
        memory-maps codes and residuals (an index with updates: after `Indexer.compact`) instead of reading
        them into memory.
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
            index = cls(path, metadata, mmap=mmap)
        except (ConfigError, KeyError) as e:
            raise CorruptIndexError(f"{meta_path}: bad config: {e}") from None
        index._validate(verify)
        return index

    def _entries(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, manifest entry) of every array the index lists: the base's, then each update's."""
        listed = self.metadata.get("arrays", {})
        out = [(n, listed[n]) for n in ARRAYS + tuple(n for n in OPTIONAL_ARRAYS if n in listed) if n in listed]
        for i, op in enumerate(self.metadata.get("log") or []):
            out += [(f"update {i} ({op['op']}) '{n}'", e) for n, e in op["arrays"].items()]
        return out

    def _field_files(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, entry) of the passage-fields SQLite files: the base's, then each add's (None: none)."""
        out = [("base", self.metadata.get("fields"))]
        out += [(f"update {i}", op.get("fields")) for i, op in enumerate(self.metadata.get("log") or [])]
        return [(label, e) for label, e in out if e]

    def _entry_path(self, name: str, entry: dict[str, Any]) -> Path:
        return self._inside(name, entry.get("path", name))

    def _inside(self, label: str, relative: Any) -> Path:
        """`self.path / relative`, refused unless it stays inside the index (no absolute path, no '..', no
        symbolic link out): metadata.json must not make us read, or an update delete, anything else."""
        rel = Path(str(relative))
        where = self.path / rel
        if rel.is_absolute() or ".." in rel.parts or not where.resolve().is_relative_to(self.path.resolve()):
            raise CorruptIndexError(f"{self.path}: metadata.json puts '{label}' at {relative!r}, outside the index")
        return where

    def _validate(self, verify: bool) -> None:
        listed = self.metadata.get("arrays", {})
        for name in ARRAYS:
            if name not in listed:
                raise CorruptIndexError(f"{self.path}: metadata.json does not list array '{name}'")
        for label, entry in self._entries():
            where = self._entry_path(label, entry)
            if not (where / "zarr.json").is_file():
                raise CorruptIndexError(f"{self.path}: array '{label}' is missing")
            try:
                store = io.open_array(where)
            except Exception as e:  # noqa: BLE001 - TensorStore raises ValueError/RuntimeError variants
                raise CorruptIndexError(f"{self.path}: array '{label}' is unreadable: {e}") from None
            shape, dtype = list(store.shape), np.dtype(store.dtype.numpy_dtype).name
            if shape != entry["shape"] or dtype != entry["dtype"]:
                raise CorruptIndexError(
                    f"{self.path}: array '{label}' is {dtype}{shape}, metadata.json says "
                    f"{entry['dtype']}{entry['shape']}"
                )
            if verify and io.array_checksum(where) != entry["sha256"]:
                raise CorruptIndexError(
                    f"{self.path}: array '{label}' is corrupt (checksum mismatch: truncated or modified files)"
                )
        for label, entry in self._field_files():
            where = self._inside(f"passage fields file {label}", entry["path"])
            if not where.is_file():
                raise CorruptIndexError(f"{self.path}: passage fields file '{label}' is missing")
            if verify and file_checksum(where) != entry["sha256"]:
                raise CorruptIndexError(f"{self.path}: passage fields file '{label}' is corrupt (checksum mismatch)")
        m = self.metadata
        base = m.get("base", m)
        n, e, p = base["num_passages"], base["num_embeddings"], m["num_partitions"]
        packed = m["dim"] * m["nbits"] // 8
        expect = {
            "doclens": [n],
            "pids": [n],
            "codes": [e],
            "centroids": [p, m["dim"]],
            "ivf_lengths": [p],
            "residuals": [e, packed],
        }
        if all(name in listed for name in OPTIONAL_ARRAYS):
            expect["text_offsets"] = [n + 1]
        checks = [(name, listed[name], shape) for name, shape in expect.items()]
        for i, op in enumerate(m.get("log") or []):
            a = op["arrays"]
            if op["op"] == "add":
                sn, se = op["num_passages"], op["num_embeddings"]
                shapes = {"codes": [se], "residuals": [se, packed], "doclens": [sn], "pids": [sn]}
                shapes |= {"text_offsets": [sn + 1]} if "text_offsets" in a else {}
            else:
                shapes = {"pids": [op["num_passages"]]}
            checks += [(f"update {i} '{name}'", a[name], shape) for name, shape in shapes.items()]
        for name, entry, shape in checks:
            if entry["shape"] != shape:
                raise CorruptIndexError(
                    f"{self.path}: array '{name}' has shape {entry['shape']}, "
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
        base = self.metadata.get("base", self.metadata)
        doclens = self._array("doclens")
        if int(doclens.sum()) != base["num_embeddings"]:
            raise CorruptIndexError(
                f"{self.path}: doclens sum to {int(doclens.sum())}, "
                f"but the index has {base['num_embeddings']} embeddings"
            )
        ivf, ivf_lengths = self._array("ivf"), self._array("ivf_lengths")
        if int(ivf_lengths.sum()) != len(ivf):
            raise CorruptIndexError(
                f"{self.path}: ivf_lengths sum to {int(ivf_lengths.sum())}, ivf has {len(ivf)} entries"
            )
        if len(np.unique(self._array("pids"))) != len(self._array("pids")):
            raise CorruptIndexError(f"{self.path}: duplicate pids")
        for i, op in enumerate(self.metadata.get("log") or []):
            if op["op"] == "add":
                lens = self._log_array(op, "doclens")
                if int(lens.sum()) != op["num_embeddings"]:
                    raise CorruptIndexError(f"{self.path}: update {i}: doclens do not sum to its embeddings")
        if self.has_updates:
            layout = self._layout  # replays the log: a delete of a pid that is not live is corrupt
            if len(layout.rows) != self.num_passages or int(self.doclens.sum()) != self.num_embeddings:
                raise CorruptIndexError(f"{self.path}: the updates do not add up to the counts in metadata.json")

    # -- counts and arrays --------------------------------------------------------------------------
    num_passages = property(lambda self: int(self.metadata["num_passages"]))
    num_embeddings = property(lambda self: int(self.metadata["num_embeddings"]))
    num_partitions = property(lambda self: int(self.metadata["num_partitions"]))
    nbits = property(lambda self: int(self.metadata["nbits"]))
    dim = property(lambda self: int(self.metadata["dim"]))

    @property
    def version(self) -> int:
        """How many updates (adds, deletes, compactions) the index has had since it was built."""
        return int(self.metadata.get("version", 0))

    @property
    def has_updates(self) -> bool:
        """Whether adds or deletes are recorded beside the base arrays (`Indexer.compact` folds them in)."""
        return bool(self.metadata.get("log"))

    def _array(self, name: str) -> np.ndarray:
        """A base array (the whole index when it has no updates)."""
        path = self._entry_path(name, self.metadata["arrays"][name])
        if self.mmap:  # read straight into the array (TensorStore's read holds a second copy for a moment)
            try:
                return self._guarded(lambda: ChunkedMemmap(path)[:])
            except ValueError:  # not stored raw
                pass
        return self._guarded(lambda: io.read_array(path))

    def _log_array(self, op: dict[str, Any], name: str) -> np.ndarray:
        return self._guarded(lambda: io.read_array(self.path / op["arrays"][name]["path"]))

    def _guarded(self, read: Callable[[], Any]) -> Any:
        """`read()` of this version's files, which are read lazily and by path: where updates since removed
        them, or a rebuild replaced the directory, an IndexChangedError saying so (not TensorStore's NOT_FOUND,
        nor another index's arrays)."""
        self._unchanged()
        try:
            out = read()
        except (ValueError, FileNotFoundError) as e:  # TensorStore says ValueError("NOT_FOUND: ...")
            if isinstance(e, ValueError) and "NOT_FOUND" not in str(e):
                raise
            raise IndexChangedError(
                f"{self.path} moved on from version {self.version}: updates since removed the files this version "
                "reads (Searcher.reload() moves to the newest version)"
            ) from None
        self._unchanged()  # after the read: a swap during it is caught too
        return out

    @functools.cached_property
    def _layout(self) -> _Layout:
        return _replay(self)

    def _live(self, name: str) -> np.ndarray:
        """`codes`/`residuals` (per embedding) or `doclens`/`pids` (per passage) of the live passages."""
        if not self.has_updates:
            if self.mmap and name in ("codes", "residuals"):
                return self._guarded(lambda: ChunkedMemmap(self._entry_path(name, self.metadata["arrays"][name])))
            return self._array(name)
        lay = self._layout
        parts = [self._array(name)] + [self._log_array(op, name) for op in lay.adds]
        whole = np.concatenate(parts)
        if name in ("doclens", "pids"):
            return whole[lay.rows]
        return whole[lay.embedding_rows()]

    codes = functools.cached_property(lambda self: self._live("codes"))
    residuals = functools.cached_property(lambda self: self._live("residuals"))
    doclens = functools.cached_property(lambda self: self._live("doclens"))
    pids = functools.cached_property(lambda self: self._live("pids"))

    @functools.cached_property
    def _ivf(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_updates:
            return self._array("ivf"), self._array("ivf_lengths")
        return build_ivf(self.codes, self.doclens, self.num_partitions)

    @property
    def ivf(self) -> np.ndarray:
        if self.mmap and not self.has_updates:  # read when asked, not kept: search copies it to the device
            return self._array("ivf")
        return self._ivf[0]

    @property
    def ivf_lengths(self) -> np.ndarray:
        if self.mmap and not self.has_updates:
            return self._array("ivf_lengths")
        return self._ivf[1]

    @functools.cached_property
    def ivf_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lengths int64 [P + 1], offsets int64 [P + 1]) of the IVF lists (lengths[P] = 0: a padding cell)."""
        lengths = np.asarray(self.ivf_lengths, np.int64)
        return np.append(lengths, 0), np.concatenate([[0], np.cumsum(lengths)])

    @functools.cached_property
    def ivf_rows(self) -> np.ndarray | ChunkedMemmap:
        """The IVF's entries, for reading some lists: a `ChunkedMemmap` of a memory-mapped index without updates."""
        if self.mmap and not self.has_updates:
            return self._guarded(lambda: ChunkedMemmap(self._entry_path("ivf", self.metadata["arrays"]["ivf"])))
        return self.ivf

    def load(self) -> Index:
        """Reads the arrays search needs into memory now (a reader then no longer depends on the files)."""
        for name in ("codes", "residuals", "doclens", "pids", "codec", "offsets"):
            getattr(self, name)
        return self

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

    def share_centroids(self, centroids) -> None:
        """Makes the codec use `centroids` (the same values, e.g. a CPU device array's host buffer) instead of the
        copy it read, which is then freed."""
        codec = self.codec
        shared = np.asarray(centroids)
        if shared.shape != codec.centroids.shape or not np.array_equal(shared, codec.centroids):
            raise ValueError("share_centroids: not the index's centroids")
        new = dataclasses.replace(codec, centroids=shared)
        import jax.numpy as jnp

        # the codec's own device copies: the same centroids array
        cutoffs, weights = (jnp.asarray(x, jnp.float32) for x in (codec.bucket_cutoffs, codec.bucket_weights))
        new.__dict__["_device"] = (centroids, cutoffs, weights)
        self.__dict__["codec"] = new

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
        listed = self.metadata.get("arrays", {})
        return all(name in listed for name in OPTIONAL_ARRAYS) and all(
            "texts" in op["arrays"] for op in self.metadata.get("log") or [] if op["op"] == "add"
        )

    @functools.cached_property
    def _text_sources(self) -> list[tuple[Any, np.ndarray]]:
        """(texts store, text_offsets) of the base and of each added segment."""
        listed = self.metadata["arrays"]
        offsets = io.read_array(self._entry_path("text_offsets", listed["text_offsets"]), strict=True)
        out = [(io.open_array(self._entry_path("texts", listed["texts"]), strict=True), offsets)]
        for op in self._layout.adds if self.has_updates else ():
            arrays = op["arrays"]
            texts = io.open_array(self.path / arrays["texts"]["path"], strict=True)
            out.append((texts, io.read_array(self.path / arrays["text_offsets"]["path"], strict=True)))
        return out

    def _unchanged(self) -> None:
        """Raises IndexChangedError where a rebuild replaced the index's directory since this version opened."""
        if _directory_id(self.path) != self._directory:
            raise IndexChangedError(
                f"{self.path} was rebuilt since version {self.version} was opened: the files this version reads "
                "are gone (Searcher.reload() moves to the new index)"
            )

    def texts(self, positions) -> list[str]:
        """The texts of the passages at `positions` (not pids), read from the index on demand."""
        if not self.has_texts:
            raise FileNotFoundError(f"{self.path} does not carry its passages' texts")
        return self._guarded(lambda: self._read_texts(positions))

    def _read_texts(self, positions) -> list[str]:
        sources = self._text_sources
        positions = np.asarray(positions, np.int64).reshape(-1)
        if self.has_updates:
            rows = self._layout.rows[positions]
            src = np.searchsorted(self._layout.row_starts, rows, side="right") - 1
            local = rows - self._layout.row_starts[src]
        else:
            src, local = np.zeros(len(positions), np.int64), positions
        if len(positions) >= BULK_TEXTS:  # many passages (compaction): one read per source, not one per passage
            whole = {int(j): np.asarray(sources[j][0].read().result()).tobytes() for j in np.unique(src)}
            return [
                whole[int(j)][int(sources[j][1][i]) : int(sources[j][1][i + 1])].decode("utf-8")
                for j, i in zip(src, local)
            ]
        reads = []
        for j, i in zip(src, local):  # concurrent
            store, offsets = sources[j]
            reads.append(store[int(offsets[i]) : int(offsets[i + 1])].read())
        return [np.asarray(r.result()).tobytes().decode("utf-8") for r in reads]

    @property
    def fields(self) -> list[str]:
        """The passage metadata fields the index stores (JSONL keys beyond id/text/title), for `select`."""
        return sorted({c for _, e in self._field_files() for c in e["columns"]})

    def select(self, where: str) -> np.ndarray:
        """Positions (ascending) of the passages whose metadata satisfy `where`, e.g. "year >= 2020 AND
        lang = 'en'" (grammar: `colbert_jax.indexing.fields`; values are bound, never formatted into SQL).
        Raises `WhereError` for a bad expression or a field the index does not have, IndexChangedError where
        updates since removed this version's fields files or a rebuild replaced them."""
        from colbert_jax.indexing.fields import WhereError, parse_where

        node = parse_where(where)
        unknown = sorted(node.fields() - set(self.fields))
        if unknown:
            known = ", ".join(self.fields) or "none"
            raise WhereError(f"where: unknown field {unknown[0]!r} (the index's passage fields: {known})")
        # Guarded: the files are read by path, and after a rebuild that path holds another index's rows.
        return self._guarded(lambda: self._select(node))

    def _select(self, node: Any) -> np.ndarray:
        """`select` of a parsed expression (`fields.Node`): each part's (base, adds) matching rows, as positions."""
        from colbert_jax.indexing.fields import null_matches, select_rows

        # A part without a fields file (built from a TSV, an add without metadata) reads every field as NULL, as
        # do rows its file lacks: all of them match or none, as an all-NULL passage does (`lang IS NULL`).
        all_null = null_matches(node)
        if self.has_updates:
            lay = self._layout
            starts = lay.row_starts
            parts = [self.metadata.get("fields")] + [op.get("fields") for op in lay.adds]
        else:
            starts = np.array([0, self.num_passages], np.int64)
            parts = [self.metadata.get("fields")]
        hits = [np.zeros(0, np.int64)]
        for start, stop, entry in zip(starts[:-1], starts[1:], parts):
            size = int(stop - start)
            if entry is None:
                rows = np.arange(size, dtype=np.int64) if all_null else np.zeros(0, np.int64)
            else:
                path = self._inside("passage fields file", entry["path"])
                rows = select_rows(path, node, entry["columns"], num_rows=size if all_null else None)
            hits.append(rows + start)
        rows = np.concatenate(hits)
        if self.has_updates:
            inverse = np.full(starts[-1], -1, np.int64)
            inverse[lay.rows] = np.arange(len(lay.rows))
            rows = inverse[rows]
            rows = rows[rows >= 0]  # replaced or deleted since
        return np.unique(rows)

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


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the live passages of an updated index are. Global rows number the base's passages, then each
    added segment's, in log order.

    rows: int64 [N] the global row of each live passage position.
    row_starts: int64 [S + 1] first global row of the base and of each segment (then the total).
    embedding_starts: int64 [R + 1] first embedding (in the same concatenation) of every global row.
    adds: the log's add entries, in order.
    """

    rows: np.ndarray
    row_starts: np.ndarray
    embedding_starts: np.ndarray
    adds: tuple[dict[str, Any], ...]

    def embedding_rows(self) -> np.ndarray:
        """Indices into the concatenated embeddings of the live passages' embeddings, in position order."""
        starts = self.embedding_starts[self.rows]
        lens = self.embedding_starts[self.rows + 1] - starts
        total = int(lens.sum())
        skip = starts - np.concatenate([[0], np.cumsum(lens)[:-1]])
        return np.repeat(skip, lens) + np.arange(total, dtype=np.int64)


def _lookup(slot_pids: np.ndarray, alive: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The live slot holding each pid of `query`, or -1."""
    live = np.flatnonzero(alive)
    order = np.argsort(slot_pids[live], kind="stable")
    keys = slot_pids[live][order]
    at = np.clip(np.searchsorted(keys, query), 0, max(len(keys) - 1, 0))
    found = (keys[at] == query) if len(keys) else np.zeros(len(query), bool)
    return np.where(found, live[order[at]] if len(keys) else -1, -1)


def _replay(index: Index) -> _Layout:
    """Replays an index's log over its base: which global row sits at each live position."""
    base_pids = index._array("pids")
    lens = [index._array("doclens").astype(np.int64)]
    slot_rows = np.arange(len(base_pids), dtype=np.int64)
    slot_pids = base_pids.astype(np.int64)
    alive = np.ones(len(base_pids), bool)
    row_starts, adds = [0, len(base_pids)], []
    for i, op in enumerate(index.metadata["log"]):
        pids = index._log_array(op, "pids").astype(np.int64)
        slot = _lookup(slot_pids, alive, pids)
        if op["op"] == "add":
            rows = np.arange(row_starts[-1], row_starts[-1] + len(pids))
            hit = slot >= 0
            slot_rows[slot[hit]] = rows[hit]  # a replacement takes the place of what it replaces
            slot_rows = np.concatenate([slot_rows, rows[~hit]])
            slot_pids = np.concatenate([slot_pids, pids[~hit]])
            alive = np.concatenate([alive, np.ones(int((~hit).sum()), bool)])
            row_starts.append(row_starts[-1] + len(pids))
            lens.append(index._log_array(op, "doclens").astype(np.int64))
            adds.append(op)
        else:
            if (slot < 0).any():
                bad = int(pids[slot < 0][0])
                raise CorruptIndexError(f"{index.path}: update {i} deletes pid {bad}, which is not live")
            alive[slot] = False
    return _Layout(
        rows=slot_rows[alive],
        row_starts=np.asarray(row_starts, np.int64),
        embedding_starts=embedding_offsets(np.concatenate(lens)),
        adds=tuple(adds),
    )


def file_checksum(path: Path) -> str:
    """sha256 of one file, read in blocks."""
    return io.content_checksum(path)


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
    fields: dict[str, Any] | None = None,
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
    if fields is not None:
        metadata["fields"] = fields
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


def _directory_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
