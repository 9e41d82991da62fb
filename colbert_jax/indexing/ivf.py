"""The inverted file: for each centroid, the sorted unique passages having an embedding with that code.

colbert-ai 0.2.22 (`indexing/utils.py::optimize_ivf`) stores the same lists; we build them with one sort
instead of a loop over centroids, and without its trailing zero padding.
"""

from __future__ import annotations

import numpy as np

__all__ = ["build_ivf", "embedding_offsets"]


def embedding_offsets(doclens: np.ndarray) -> np.ndarray:
    """Start of each passage's embeddings, plus the total at the end: int64 [N + 1]."""
    return np.concatenate([[0], np.cumsum(doclens, dtype=np.int64)])


def build_ivf(codes: np.ndarray, doclens: np.ndarray, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes int [n_emb], doclens [N]) -> (ivf int32 [sum lengths] passage positions, lengths int32 [P])."""
    num_passages = len(doclens)
    passage_of = np.repeat(np.arange(num_passages, dtype=np.int64), doclens)
    if len(passage_of) != len(codes):
        raise ValueError(f"{len(codes)} codes but doclens sum to {len(passage_of)}")
    pairs = np.unique(codes.astype(np.int64) * num_passages + passage_of)  # sorted by centroid, then passage
    ivf = (pairs % num_passages).astype(np.int32)
    lengths = np.bincount(pairs // num_passages, minlength=num_partitions).astype(np.int32)
    return ivf, lengths
