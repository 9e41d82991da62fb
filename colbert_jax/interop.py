"""colbert-ai index files -> colbert-jax, without torch (files read by `torch_io.load_torch_file`).

A colbert-ai 0.2.22 PLAID index directory holds `metadata.json` (or only `plan.json` while building),
`centroids.pt` (float16 [P, dim]), `buckets.pt` ((cutoffs, weights)), `avg_residual.pt`,
`ivf.pid.pt` ((ivf, lengths)), and per chunk `N.codes.pt`, `N.residuals.pt`, `doclens.N.json`,
`N.metadata.json`. Passage ids are positions in the collection.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from colbert_jax import io
from colbert_jax.config import ColBERTConfig
from colbert_jax.index import CorruptIndexError, Index, is_index_dir, write_index
from colbert_jax.indexing.codec import ResidualCodec
from colbert_jax.torch_io import TorchFileError, load_torch_file

__all__ = ["read_colbert_codec", "import_colbert_index"]


def _load(path: Path):
    if not path.is_file():
        raise CorruptIndexError(f"{path.parent}: missing {path.name} (not a complete colbert-ai index)")
    try:
        return load_torch_file(path)
    except TorchFileError as e:
        raise CorruptIndexError(str(e)) from None


def _scalar(x) -> float:
    return float(np.asarray(x, np.float32).reshape(-1)[0]) if np.size(x) else 0.0


def read_colbert_codec(index_dir: str | os.PathLike) -> ResidualCodec:
    """The residual codec of a colbert-ai index (centroids, bucket cutoffs and weights)."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index directory not found: {index_dir}")
    centroids = np.asarray(_load(index_dir / "centroids.pt"), np.float32)
    buckets = _load(index_dir / "buckets.pt")
    if not (isinstance(buckets, tuple) and len(buckets) == 2):
        raise CorruptIndexError(f"{index_dir}/buckets.pt: expected (cutoffs, weights)")
    cutoffs, weights = (np.asarray(b, np.float32) for b in buckets)
    avg_path = index_dir / "avg_residual.pt"
    avg = _scalar(load_torch_file(avg_path)) if avg_path.is_file() else 0.0
    nbits = int(round(math.log2(len(weights))))
    if (1 << nbits) != len(weights):
        raise CorruptIndexError(f"{index_dir}/buckets.pt: {len(weights)} bucket weights is not a power of two")
    return ResidualCodec(centroids, cutoffs, weights, nbits, avg)


def import_colbert_index(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *, overwrite: bool = False, checkpoint: str | None = None
) -> Path:
    """Converts a colbert-ai PLAID index into a colbert-jax index (atomically; the source is not changed).

    The inverted file is rebuilt from the codes and checked against colbert-ai's `ivf.pid.pt`.
    `checkpoint` overrides the checkpoint path recorded in the index's config.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"index directory not found: {src}")
    io.check_target(dst, overwrite=overwrite, what="colbert-jax index", is_ours=is_index_dir)
    meta_path = src / "metadata.json"
    if not meta_path.is_file():
        raise CorruptIndexError(f"{src}: missing metadata.json (not a finished colbert-ai index)")
    meta = json.loads(meta_path.read_text())
    config = ColBERTConfig.from_reference_dict(meta, source=str(meta_path))
    if checkpoint is not None:
        config = config.replace(checkpoint=str(checkpoint))
    codec = read_colbert_codec(src)
    if codec.dim != config.dim:
        raise CorruptIndexError(f"{src}: centroids have dim {codec.dim}, the config says {config.dim}")
    num_chunks = int(meta["num_chunks"])

    doclens_per_chunk = []
    passages = embeddings = 0
    for i in range(num_chunks):
        path = src / f"doclens.{i}.json"
        if not path.is_file():
            raise CorruptIndexError(f"{src}: missing {path.name}")
        lens = np.asarray(json.loads(path.read_text()), np.int32)
        doclens_per_chunk.append(lens)
        _check_chunk_metadata(src, i, lens, passages, embeddings)
        passages, embeddings = passages + len(lens), embeddings + int(lens.sum())
    num_embeddings = int(sum(int(d.sum()) for d in doclens_per_chunk))
    if "num_embeddings" in meta and int(meta["num_embeddings"]) != num_embeddings:
        raise CorruptIndexError(f"{src}: doclens sum to {num_embeddings}, metadata.json says {meta['num_embeddings']}")
    num_passages = int(sum(len(d) for d in doclens_per_chunk))

    def chunks():
        for i, lens in enumerate(doclens_per_chunk):
            codes = np.asarray(_load(src / f"{i}.codes.pt"), np.int32)
            residuals = np.asarray(_load(src / f"{i}.residuals.pt"), np.uint8)
            if len(codes) != int(lens.sum()) or residuals.shape != (len(codes), codec.packed_dim):
                raise CorruptIndexError(
                    f"{src}: chunk {i} has {len(codes)} codes and residuals {residuals.shape} "
                    f"for {int(lens.sum())} embeddings"
                )
            yield codes, residuals, lens

    dst.parent.mkdir(parents=True, exist_ok=True)
    out = io.work_dir(dst)  # this process's own: two imports to one path must not share one
    try:
        write_index(
            out,
            config=config,
            codec=codec,
            chunks=chunks(),
            num_embeddings=num_embeddings,
            pids=np.arange(num_passages, dtype=np.int64),
            checkpoint={"path": config.checkpoint, "fingerprint": None},
            collection={"source": config.collection, "fingerprint": None},
            build={"imported_from": str(src.resolve())},
        )
        _check_ivf(src, out)
        # An index already there may have a writer (add, delete, compact) in flight: swap only under its lock.
        with io.locked_dir(dst) if dst.is_dir() else contextlib.nullcontext():
            io.replace_dir(out, dst)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return dst


def _check_chunk_metadata(src: Path, i: int, lens: np.ndarray, passage_offset: int, embedding_offset: int) -> None:
    """colbert-ai's `{i}.metadata.json` (where present) must agree with the chunk's doclens and place."""
    path = src / f"{i}.metadata.json"
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    expected = {
        "num_passages": len(lens),
        "num_embeddings": int(lens.sum()),
        "passage_offset": passage_offset,
        "embedding_offset": embedding_offset,
    }
    for key, value in expected.items():
        if key in meta and int(meta[key]) != value:
            raise CorruptIndexError(
                f"{path}: {key} is {meta[key]}, doclens.{i}.json and the chunks before give {value}"
            )


def _check_ivf(src: Path, out: Path) -> None:
    """colbert-ai's ivf.pid.pt (if present) must hold the lists we rebuilt (it may carry zero padding)."""
    path = src / "ivf.pid.pt"
    if not path.is_file():
        warnings.warn(
            f"{src} has no ivf.pid.pt: its inverted file is rebuilt from the codes but cannot be checked against "
            "colbert-ai's",
            stacklevel=3,
        )
        return
    ivf_ref, lengths_ref = _load(path)
    index = Index.open(out, verify=False)
    lengths_ref = np.asarray(lengths_ref, np.int64)
    n = int(lengths_ref.sum())
    if not (np.array_equal(lengths_ref, index.ivf_lengths) and np.array_equal(np.asarray(ivf_ref)[:n], index.ivf)):
        raise CorruptIndexError(f"{src}: ivf.pid.pt does not match the codes and doclens of the index")
