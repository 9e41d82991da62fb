"""Updating an index in place: add (or replace), delete and compact passages, atomically.

An add encodes only the new passages, compresses them with the index's codec and writes them as a segment
(`segments/<name>/`); a delete writes the deleted pids (`updates/<name>/pids`). Neither touches the base
arrays: an update costs its own encoding and writes proportional to it. `compact` folds the log into a new
base (`gen-<name>/`), optionally with centroids retrained on the current passages.

Every update writes new files only, then commits by replacing `metadata.json` (one rename): a process killed
at any instant leaves the previous version or the new one, and files written by an update that never
committed are removed by the next one. Files a commit stops referencing are kept for one more version (a
reader that opened the previous version can still read them) and removed by the commit after. Writers take
an exclusive lock (`io.locked_dir`: `.lock`, released by the kernel when a writer dies), as does a rebuild
before it swaps a new index in.

Encoding is bit-identical to a rebuild's (`colbert_jax.indexing.encode`), so a passage added here has the
same codes and residuals as in `Indexer(model, codec=index).index(...)` over the final collection.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from colbert_jax import io
from colbert_jax.errors import needs_option
from colbert_jax.index import ARRAYS, OPTIONAL_ARRAYS, Index, file_checksum
from colbert_jax.indexing.collection import Collection, CollectionError
from colbert_jax.indexing.encode import encode_passages
from colbert_jax.indexing.fields import FieldError, FieldSchema, column_kinds, read_fields, write_fields
from colbert_jax.indexing.ivf import build_ivf

__all__ = ["IndexDriftWarning", "add", "delete", "compact", "DRIFT_TOLERANCE", "MAX_ADDED_SHARE"]

DRIFT_TOLERANCE = 0.02  # warn when added embeddings reconstruct this much worse (mean cosine) than the index's
MAX_ADDED_SHARE = 0.25  # warn when passages added since the centroids were trained exceed this share
BASELINE_SAMPLE = 512  # passages re-encoded to measure an index's own reconstruction when it was not recorded

# Tests set this to a function called at each step boundary of an update (to simulate a crash there).
_fault_hook: Callable[[str], None] | None = None


class IndexDriftWarning(UserWarning):
    """Passages added to an index fit its centroids clearly worse than its own, or are a large share of it."""


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def _units(metadata: dict[str, Any]) -> set[str]:
    """The directories (relative to the index) that a version's arrays live in."""
    out = set()
    entries = list(metadata.get("arrays", {}).items())
    for op in metadata.get("log") or []:
        entries += list(op["arrays"].items())
    for name, entry in entries:
        parts = Path(entry.get("path", name)).parts
        out.add(str(Path(*parts[:2])) if parts[0] in ("segments", "updates") else parts[0])
    return out


def _remove_orphans(path: Path, metadata: dict[str, Any]) -> None:
    """Removes what killed updates left: files no version names (only where updates write)."""
    keep = _units(metadata) | set(metadata.get("retired", []))
    candidates = [p for d in ("segments", "updates") if (path / d).is_dir() for p in (path / d).iterdir()]
    candidates += list(path.glob("gen-*"))
    # A build's own arrays, once a compaction moved them to a generation: retired, and deleted by the commit
    # after, unless a kill came between that commit and the deletion.
    # (Arrays only: every version names its arrays, and `_units` reads them all.)
    candidates += [path / name for name in (*ARRAYS, *OPTIONAL_ARRAYS) if (path / name).exists()]
    for p in candidates:
        if str(p.relative_to(path)) not in keep:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for tmp in path.glob(".metadata.json.tmp*"):
        tmp.unlink(missing_ok=True)


def _commit(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Makes `new` the index's version (one rename), then removes the files retired one version ago."""
    new["version"] = int(old.get("version", 0)) + 1
    new["retired"] = sorted(_units(old) - _units(new))
    _step("commit")
    io.write_json(path / "metadata.json", new)
    _step("committed")
    for unit in old.get("retired", []):
        if unit not in _units(new) and (path / unit).exists():
            shutil.rmtree(path / unit, ignore_errors=True)


def _fresh(version: int) -> str:
    return f"{version + 1:06d}-{secrets.token_hex(4)}"


def _write(where: Path, rel: str, data: np.ndarray) -> dict[str, Any]:
    _step(f"write {rel}")
    return {**io.write_array(where / rel, data), "path": rel}


def _text_arrays(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = [t.encode("utf-8") for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data], dtype=np.int64)])
    return np.frombuffer(b"".join(data), np.uint8), offsets


def _fields_entry(path: Path, rel: str, columns: list[str] | None) -> dict[str, Any] | None:
    if columns is None:
        return None
    return {"path": rel, "sha256": file_checksum(path / rel), "columns": columns}


def _fold_fields(index: Index, path: Path, rel: str) -> dict[str, Any] | None:
    """The live passages' metadata fields, in position order, as one new `fields.sqlite` at `rel`: a row for
    every live passage (all NULL for those of parts without fields) and every column the index lists, so that
    the compacted index selects exactly what it did (`lang IS NULL` included)."""
    if not index.fields:
        return None
    _step(f"write {rel}")
    records: dict[int, dict[str, Any]] = {}
    if index.has_updates:
        lay = index._layout
        inverse = np.full(lay.row_starts[-1], -1, np.int64)
        inverse[lay.rows] = np.arange(len(lay.rows))
        sources = [index.metadata.get("fields")] + [op.get("fields") for op in lay.adds]
        for start, entry in zip(lay.row_starts, sources):
            for row, f in (read_fields(path / entry["path"]) if entry else {}).items():
                if inverse[start + row] >= 0:
                    records[int(inverse[start + row])] = f
    else:
        records = read_fields(path / index.metadata["fields"]["path"])
    (path / rel).parent.mkdir(parents=True, exist_ok=True)
    pids = index.pids
    rows = ((i, int(pids[i]), records.get(i, {})) for i in range(len(pids)))
    # check_types=False: an index whose parts disagree on a field's type must still compact (select compares
    # each stored value the same way before and after).
    columns = write_fields(path / rel, rows, columns=index.fields, check_types=False)
    return _fields_entry(path, rel, columns)


def _next_pid(index: Index) -> int:
    """The first pid a list of texts added to `index` gets: after the largest it holds or ever held."""
    return max(int(index.pids.max(initial=-1)) + 1, int(index.metadata.get("next_pid", 0)))


def _check_fields_fit(index: Index, path: Path, coll: Collection) -> None:
    """Refuses an add whose passage fields clash with the index's (a name equal but for case, a field of
    numbers given text): compaction could not fold them into one table, and `where` would compare wrongly."""
    if not coll.field_kinds or not index.fields:
        return
    sample = {"number": 0, "text": "", None: None}
    schema = FieldSchema()
    try:
        for label, entry in index._field_files():
            kinds = column_kinds(path / entry["path"], entry["columns"])
            schema.add({name: sample[kind] for name, kind in kinds.items()}, f"{path} ({label})")
        schema.add({name: sample[kind] for name, kind in coll.field_kinds.items()}, coll.source)
    except FieldError as e:
        raise CollectionError(f"{coll.source} does not fit the index {path}: {e}") from None


def _open(path: Path, *, verify: bool = False) -> Index:
    """The index an update starts from. verify: check every array's checksum first (`compact`, which rewrites
    the arrays: damage must stop it, not be copied into a new generation under fresh checksums)."""
    if not (Path(path) / "metadata.json").is_file():
        Index.open(path)  # raises the error that says what is wrong
    return Index.open(path, verify=verify)


# -- add ---------------------------------------------------------------------------------------------
def add(
    indexer,
    path: Path,
    collection,
    *,
    replace: bool = False,
    drift_tolerance: float = DRIFT_TOLERANCE,
    max_added_share: float = MAX_ADDED_SHARE,
    log: Callable[[str], None] = lambda m: None,
) -> np.ndarray:
    """See `Indexer.add`."""
    with io.locked_dir(path):
        index = _open(path)
        _remove_orphans(path, index.metadata)
        model = indexer._model_for(index)
        coll = Collection.load(collection)
        _check_fields_fit(index, path, coll)
        live = index.pids
        if coll.path is None:  # a list of texts: pids after the largest the index ever held (a deleted pid
            # given again would point rankings, qrels or stores kept by pid at another passage)
            pids = _next_pid(index) + np.arange(len(coll), dtype=np.int64)
        else:
            pids = coll.pids.astype(np.int64)
        present = np.isin(pids, live)
        if present.any() and not replace:
            raise needs_option(
                ValueError,
                f"pid {int(pids[present][0])} is already in the index {path}"
                + (f" (and {int(present.sum()) - 1} more)" if present.sum() > 1 else ""),
                argument="replace=True",
                flag="--replace",
                purpose="replace those passages",
            )
        texts = coll.texts(range(len(coll)))
        per_passage = encode_passages(model, texts)
        doclens = np.array([len(e) for e in per_passage], np.int32)
        flat = np.concatenate(per_passage).astype(np.float16)
        codec = index.codec
        codes, residuals = codec.compress(flat)
        cosine = _reconstruction_cosine(codec, flat, codes, residuals)

        m = copy.deepcopy(index.metadata)
        baseline = (m.get("drift") or {}).get("baseline_cosine")
        if m.get("drift") is None:  # first add since the build (or a recluster): measure the index's own
            baseline = _baseline_cosine(index, model)

        name = _fresh(index.version)
        rel = f"segments/{name}"
        arrays = {
            "codes": _write(path, f"{rel}/codes", codes),
            "residuals": _write(path, f"{rel}/residuals", residuals),
            "doclens": _write(path, f"{rel}/doclens", doclens),
            "pids": _write(path, f"{rel}/pids", pids),
        }
        if index.has_texts:
            text_data, text_offsets = _text_arrays(texts)
            arrays["texts"] = _write(path, f"{rel}/texts", text_data)
            arrays["text_offsets"] = _write(path, f"{rel}/text_offsets", text_offsets)
        else:  # they could never be read back (texts come from the collection), and compaction dropped them
            warnings.warn(
                f"{path} does not carry its passages' texts (an imported index, or one built before 0.2): the "
                f"{len(pids):,} added passages' texts are not stored in it either; keep them with your collection "
                "(Searcher.passages(pids, collection=FILE) reads texts from it)",
                UserWarning,
                stacklevel=3,
            )
        fields = None
        if coll.may_have_fields:
            _step(f"write {rel}/fields.sqlite")
            (path / rel).mkdir(parents=True, exist_ok=True)
            records = zip(range(len(pids)), pids.tolist(), coll.fields(range(len(pids))))
            fields = _fields_entry(path, f"{rel}/fields.sqlite", write_fields(path / rel / "fields.sqlite", records))
        replaced = pids[present]
        gone = int(index.doclens[index.positions(replaced)].sum()) if len(replaced) else 0
        m.setdefault("base", {"num_passages": m["num_passages"], "num_embeddings": m["num_embeddings"]})
        m.setdefault("log", []).append(
            {
                "op": "add",
                "name": name,
                "num_passages": len(pids),
                "num_embeddings": int(doclens.sum()),
                "replaced": int(present.sum()),
                "reconstruction_cosine": cosine,
                "arrays": arrays,
            }
            | ({"fields": fields} if fields else {})
        )
        m["next_pid"] = max(_next_pid(index), int(pids.max(initial=-1)) + 1)
        m["num_passages"] = index.num_passages + len(pids) - len(replaced)
        m["num_embeddings"] = index.num_embeddings + int(doclens.sum()) - gone
        m["avg_doclen"] = m["num_embeddings"] / max(m["num_passages"], 1)
        drift = _drift(m.get("drift"), baseline, cosine, len(pids), len(flat), m["num_passages"])
        m["drift"] = drift
        _commit(path, index.metadata, m)

    message = (
        f"added {len(pids):,} passages ({len(replaced):,} replaced, {len(flat):,} embeddings) to {path}: "
        f"reconstruction cosine {cosine:.4f}"
        + (f" (the index's own: {baseline:.4f})" if baseline is not None else "")
        + f"; passages added since the centroids were trained: {drift['added_share']:.1%} of the index"
    )
    log(message)
    indexer.stats = {"added": len(pids), "replaced": len(replaced), "embeddings": len(flat), "drift": drift}
    if baseline is not None and cosine < baseline - drift_tolerance:
        warnings.warn(
            f"{message}: the new passages fit the index's centroids clearly worse than its own passages; "
            "Indexer().compact(index, recluster=True) (colbert-jax compact --recluster) retrains them",
            IndexDriftWarning,
            stacklevel=3,
        )
    elif drift["added_share"] > max_added_share:
        warnings.warn(
            f"{message}: more than {max_added_share:.0%} of the index was added after its centroids were trained; "
            "Indexer().compact(index, recluster=True) (colbert-jax compact --recluster) retrains them",
            IndexDriftWarning,
            stacklevel=3,
        )
    return pids


def _reconstruction_cosine(codec, flat: np.ndarray, codes: np.ndarray, residuals: np.ndarray) -> float:
    """Mean cosine between embeddings (as stored before compression: float16) and their decompressed codes."""
    e = flat.astype(np.float32)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    d = codec.decompress(codes, residuals)  # L2-normalised
    return float((e * d).sum(1).mean()) if len(e) else 1.0


def _baseline_cosine(index: Index, model) -> float | None:
    """The index's own reconstruction cosine, from a seeded sample of its passages re-encoded (indexes record
    it from their first add on)."""
    if not index.has_texts:
        return None
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(index.num_passages, min(BASELINE_SAMPLE, index.num_passages), replace=False))
    flat = np.concatenate(encode_passages(model, index.texts(positions))).astype(np.float16)
    codes, residuals = index.codec.compress(flat)
    return _reconstruction_cosine(index.codec, flat, codes, residuals)


def _drift(old: dict | None, baseline, cosine: float, passages: int, embeddings: int, total: int) -> dict:
    old = old or {}
    n0, e0 = old.get("added_passages", 0), old.get("added_embeddings", 0)
    mean0 = old.get("added_cosine") or 0.0
    return {
        "baseline_cosine": baseline,
        "last_add_cosine": cosine,
        "added_cosine": (mean0 * e0 + cosine * embeddings) / max(e0 + embeddings, 1),
        "added_passages": n0 + passages,
        "added_embeddings": e0 + embeddings,
        "added_share": min(1.0, (n0 + passages) / max(total, 1)),
    }


# -- delete ------------------------------------------------------------------------------------------
def delete(path: Path, pids, *, log: Callable[[str], None] = lambda m: None) -> int:
    """See `Indexer.delete`."""
    if isinstance(pids, str | bytes):
        raise TypeError(f"pids must be a collection of integer pids, not a string ({pids!r})")
    given = np.asarray(pids if isinstance(pids, np.ndarray) else list(pids))
    if given.size == 0:
        raise ValueError("no pids to delete")
    if given.dtype.kind not in "iu":  # a float or string pid converted would delete another passage
        raise TypeError(f"pids must be integers, got {given.dtype} (e.g. {given.ravel()[0]!r})")
    pids = np.unique(given.astype(np.int64))
    with io.locked_dir(path):
        index = _open(path)
        _remove_orphans(path, index.metadata)
        positions = index.positions(pids)  # KeyError naming an unknown pid
        if len(pids) >= index.num_passages:
            raise ValueError(f"deleting {len(pids):,} passages would leave {path} empty; build a new index instead")
        m = copy.deepcopy(index.metadata)
        m["next_pid"] = _next_pid(index)  # the deleted largest pids are not given out again
        name = _fresh(index.version)
        arrays = {"pids": _write(path, f"updates/{name}/pids", pids)}
        m.setdefault("base", {"num_passages": m["num_passages"], "num_embeddings": m["num_embeddings"]})
        m.setdefault("log", []).append({"op": "delete", "name": name, "num_passages": len(pids), "arrays": arrays})
        m["num_passages"] = index.num_passages - len(pids)
        m["num_embeddings"] = index.num_embeddings - int(index.doclens[positions].sum())
        m["avg_doclen"] = m["num_embeddings"] / max(m["num_passages"], 1)
        if m.get("drift"):
            m["drift"]["added_share"] = min(1.0, m["drift"]["added_passages"] / max(m["num_passages"], 1))
        _commit(path, index.metadata, m)
    log(f"deleted {len(pids):,} passages from {path}")
    return len(pids)


# -- compact -----------------------------------------------------------------------------------------
def compact(indexer, path: Path, *, recluster: bool = False, log: Callable[[str], None] = lambda m: None) -> None:
    """See `Indexer.compact`."""
    with io.locked_dir(path):
        index = _open(path, verify=True)
        _remove_orphans(path, index.metadata)
        if not index.has_updates and not recluster:
            log(f"{path} has no updates to fold in")
            return
        m = copy.deepcopy(index.metadata)
        name = f"gen-{_fresh(index.version)}"
        if recluster:
            m = _recluster(indexer, index, path, name, m)
        else:
            texts, offsets = (None, None)
            if index.has_texts:
                texts, offsets = _text_arrays(index.texts(np.arange(index.num_passages)))
            elif stored := sum(op["num_passages"] for op in m.get("log") or [] if "texts" in op["arrays"]):
                warnings.warn(  # earlier adds stored them, though they could never be read back
                    f"{path} does not carry its passages' texts: the texts that {stored:,} added passages stored "
                    "are not kept by the compaction; keep them with your collection",
                    UserWarning,
                    stacklevel=3,
                )
            ivf, ivf_lengths = build_ivf(index.codes, index.doclens, index.num_partitions)
            new = {
                "codes": index.codes,
                "residuals": index.residuals,
                "doclens": index.doclens.astype(np.int32),
                "pids": index.pids.astype(np.int64),
                "ivf": ivf,
                "ivf_lengths": ivf_lengths,
            }
            if texts is not None:
                new |= {"texts": texts, "text_offsets": offsets}
            # The codec goes into the generation too: a directory is kept whole while any array in it is named,
            # so centroids left in an earlier (reclustered) generation kept all of its arrays on disk.
            codec = index.codec
            new |= {
                "centroids": index._array("centroids"),
                "bucket_cutoffs": codec.bucket_cutoffs,
                "bucket_weights": codec.bucket_weights,
            }
            m["arrays"] = {key: _write(path, f"{name}/{key}", value) for key, value in new.items()}
        fields = _fold_fields(index, path, f"{name}/fields.sqlite")
        m.pop("fields", None)
        if fields:
            m["fields"] = fields
        for key in ("log", "base"):
            m.pop(key, None)
        _commit(path, index.metadata, m)
    log(f"compacted {path}" + (" with centroids retrained on its current passages" if recluster else ""))


def _recluster(indexer, index: Index, path: Path, name: str, m: dict[str, Any]) -> dict[str, Any]:
    """A fresh build over the index's current passages (new centroids), moved into `path/name`."""
    if not index.has_texts:
        raise ValueError(f"{path} does not carry its passages' texts: rebuild it from its collection instead")
    from colbert_jax.indexing.build import Indexer

    model = indexer._model_for(index)
    coll = Collection(
        index.pids.astype(np.int64),
        texts=index.texts(np.arange(index.num_passages)),
        fingerprint=f"recluster of {m.get('build', {}).get('created')} v{index.version}",
    )
    scratch = path.parent / f".{path.name}.recluster"
    shutil.rmtree(scratch, ignore_errors=True)
    builder = Indexer(model, chunksize=indexer.chunksize, show_progress=indexer.show_progress, nbits=index.nbits)
    builder.index(scratch, coll)
    _step("rebuilt")
    built = io.read_json(scratch / "metadata.json")
    os.replace(scratch, path / name)
    _step("moved")
    (path / name / "metadata.json").unlink()
    arrays = {}
    for key in ARRAYS + OPTIONAL_ARRAYS:
        arrays[key] = {**built["arrays"][key], "path": f"{name}/{key}"}
    for key in ("num_passages", "num_embeddings", "num_partitions", "avg_doclen", "avg_residual", "build"):
        m[key] = built[key]
    m["arrays"] = arrays
    m["drift"] = None
    return m
